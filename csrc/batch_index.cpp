// Packed batch index: position_ids and cu_seqlens for a micro-batch of packed rows.
//
// Input: sample lengths of all rows, flattened (lengths), and row_offsets[b+1] so that row r holds
// lengths[row_offsets[r] : row_offsets[r+1]]; every row is seq_len tokens long.
// Output:
//   position_ids int64[b, seq_len]: 0, 1, ... restarting at every sample;
//   cu_seqlens int32[nseg+1]: segment boundaries over the flattened b*seq_len token stream.
// Segments: every sample of non-zero length, in order; then, if a row has tokens left over, the
// padding is ONE more segment whose positions also count from 0 (so no real token attends to
// padding and padding positions stay small). Zero-length samples produce no segment.
#include <string>

#include "common.h"

namespace hpctrain {
namespace {

struct BatchIndex {
    std::vector<int64_t> position_ids;
    std::vector<int32_t> cu_seqlens;
};

template <typename T>
void check_rows(const T* len, int64_t nlen, const int64_t* off, int64_t rows, int64_t seq_len) {
    if (off[0] != 0 || off[rows] != nlen) {
        throw std::invalid_argument("row_offsets must start at 0 and end at len(lengths) = " +
                                    std::to_string(nlen) + ", got " + std::to_string(off[0]) +
                                    " .. " + std::to_string(off[rows]));
    }
    for (int64_t r = 0; r < rows; ++r) {  // bounds first: the sums below index lengths with them
        if (off[r + 1] < off[r] || off[r + 1] > nlen) {
            throw std::invalid_argument("row_offsets must be non-decreasing and <= len(lengths) (row " +
                                        std::to_string(r) + ")");
        }
    }
    for (int64_t r = 0; r < rows; ++r) {
        int64_t total = 0;
        for (int64_t i = off[r]; i < off[r + 1]; ++i) {
            if (len[i] < 0) {
                throw std::invalid_argument("lengths[" + std::to_string(i) + "] = " +
                                            std::to_string(len[i]) + " is negative");
            }
            total += len[i];
        }
        if (total > seq_len) {
            throw std::invalid_argument("row " + std::to_string(r) + " holds " + std::to_string(total) +
                                        " tokens, more than seq_len = " + std::to_string(seq_len));
        }
    }
}

template <typename T>
BatchIndex build(const T* len, const int64_t* off, int64_t rows, int64_t seq_len) {
    BatchIndex out;
    out.position_ids.resize(static_cast<size_t>(rows * seq_len));
    out.cu_seqlens.push_back(0);
    int64_t base = 0;
    for (int64_t r = 0; r < rows; ++r, base += seq_len) {
        int64_t* pos = out.position_ids.data() + base;
        int64_t t = 0;
        for (int64_t i = off[r]; i < off[r + 1]; ++i) {
            const int64_t n = len[i];
            if (n == 0) continue;
            for (int64_t j = 0; j < n; ++j) pos[t + j] = j;
            t += n;
            out.cu_seqlens.push_back(static_cast<int32_t>(base + t));
        }
        if (t < seq_len) {
            for (int64_t j = 0; t + j < seq_len; ++j) pos[t + j] = j;
            out.cu_seqlens.push_back(static_cast<int32_t>(base + seq_len));
        }
    }
    return out;
}

py::tuple packed_batch_index(const py::array& lengths, const py::array& row_offsets, int64_t seq_len) {
    const IntArray len = int_array(lengths, "lengths");
    const IntArray off = int_array(row_offsets, "row_offsets");
    if (!off.is64) throw py::type_error("row_offsets must be int64");
    if (off.size < 1) throw std::invalid_argument("row_offsets must have at least one entry (0)");
    if (seq_len <= 0) throw std::invalid_argument("seq_len must be > 0, got " + std::to_string(seq_len));
    const int64_t rows = off.size - 1;
    if (rows * seq_len >= (int64_t(1) << 31)) {
        throw std::invalid_argument("rows * seq_len = " + std::to_string(rows * seq_len) +
                                    " tokens do not fit int32 cu_seqlens; use a smaller micro-batch");
    }
    const auto* offp = static_cast<const int64_t*>(off.data);
    BatchIndex res;
    {
        py::gil_scoped_release release;
        res = with_int_type(len, [&](auto* p) {
            check_rows(p, len.size, offp, rows, seq_len);
            return build(p, offp, rows, seq_len);
        });
    }
    const auto nseg = static_cast<py::ssize_t>(res.cu_seqlens.size());
    return py::make_tuple(to_numpy(std::move(res.position_ids), {rows, seq_len}),
                          to_numpy(std::move(res.cu_seqlens), {nseg}));
}

}  // namespace

void register_batch_index(py::module_& m) {
    m.def("packed_batch_index", &packed_batch_index, py::arg("lengths"), py::arg("row_offsets"),
          py::arg("seq_len"), "position_ids int64[b, seq_len] and cu_seqlens int32 for packed rows.");
}

}  // namespace hpctrain
