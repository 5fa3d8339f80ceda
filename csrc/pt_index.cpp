// Pretraining sample index over a concatenated document stream (in the spirit of Megatron's
// build_sample_idx), plus the document boundaries inside every window.
//
// The stream is doc_lengths[doc_order[0]], doc_lengths[doc_order[1]], ... concatenated.
// Window i covers stream tokens [i*S, i*S + S] inclusive (S + 1 tokens: S inputs + the shifted
// label), so consecutive windows share one token, as in Megatron.
// Output:
//   sample_idx int64[num_samples+1, 2]: (position in doc_order, offset inside that document) of
//     stream token i*S; window i runs from sample_idx[i] to sample_idx[i+1] inclusive.
//   boundary_offsets int64[num_samples+1], boundaries int32[...]: CSR; window i's entries are the
//     positions p in [1, S] where a new (non-empty) document starts inside the window.
#include <string>

#include "common.h"

namespace hpctrain {
namespace {

struct PtIndex {
    std::vector<int64_t> sample_idx, boundary_offsets;
    std::vector<int32_t> boundaries;
};

template <typename T>
PtIndex build(const T* len, const IntArray& order, int64_t seq_length, int64_t num_samples) {
    PtIndex out;
    out.sample_idx.resize(static_cast<size_t>(2 * (num_samples + 1)));
    out.boundary_offsets.resize(static_cast<size_t>(num_samples + 1));
    int64_t p = 0, doc_start = 0;  // current document (position in order) and its stream offset
    for (int64_t i = 0; i <= num_samples; ++i) {
        const int64_t start = i * seq_length;
        while (doc_start + len[order[p]] <= start) doc_start += len[order[p++]];
        out.sample_idx[2 * i] = p;
        out.sample_idx[2 * i + 1] = start - doc_start;
        out.boundary_offsets[i] = static_cast<int64_t>(out.boundaries.size());
        if (i == num_samples) break;
        int64_t q = p + 1, q_start = doc_start + len[order[p]];
        while (q < order.size && q_start <= start + seq_length) {
            const int64_t n = len[order[q]];
            if (n > 0) out.boundaries.push_back(static_cast<int32_t>(q_start - start));
            q_start += n;
            ++q;
        }
    }
    return out;
}

template <typename T>
int64_t stream_tokens(const T* len, int64_t ndocs, const IntArray& order) {
    for (int64_t d = 0; d < ndocs; ++d) {
        if (len[d] < 0) {
            throw std::invalid_argument("doc_lengths[" + std::to_string(d) + "] = " +
                                        std::to_string(len[d]) + " is negative");
        }
    }
    int64_t total = 0;
    for (int64_t k = 0; k < order.size; ++k) {
        const int64_t d = order[k];
        if (d < 0 || d >= ndocs) {
            throw std::invalid_argument("doc_order[" + std::to_string(k) + "] = " + std::to_string(d) +
                                        " is not a document index in [0, " + std::to_string(ndocs) + ")");
        }
        total += len[d];
    }
    return total;
}

py::tuple pt_sample_index(const py::array& doc_lengths, const py::array& doc_order, int64_t seq_length,
                          int64_t num_samples) {
    const IntArray len = int_array(doc_lengths, "doc_lengths");
    const IntArray order = int_array(doc_order, "doc_order");
    if (seq_length <= 0 || seq_length >= (int64_t(1) << 31)) {
        throw std::invalid_argument("seq_length must be in [1, 2^31), got " + std::to_string(seq_length));
    }
    PtIndex res;
    {
        py::gil_scoped_release release;
        res = with_int_type(len, [&](auto* p) {
            const int64_t total = stream_tokens(p, len.size, order);
            const int64_t possible = total > 0 ? (total - 1) / seq_length : 0;
            if (num_samples < 0) num_samples = possible;
            if (num_samples > possible) {
                throw std::invalid_argument(
                    "num_samples = " + std::to_string(num_samples) + " needs " +
                    std::to_string(num_samples * seq_length + 1) + " tokens but the documents hold " +
                    std::to_string(total) + " (at most " + std::to_string(possible) + " samples)");
            }
            if (total == 0) return PtIndex{{0, 0}, {0}, {}};
            return build(p, order, seq_length, num_samples);
        });
    }
    const auto ns = static_cast<py::ssize_t>(res.boundary_offsets.size());
    const auto nb = static_cast<py::ssize_t>(res.boundaries.size());
    return py::make_tuple(to_numpy(std::move(res.sample_idx), {ns, 2}),
                          to_numpy(std::move(res.boundary_offsets), {ns}),
                          to_numpy(std::move(res.boundaries), {nb}));
}

}  // namespace

void register_pt_index(py::module_& m) {
    m.def("pt_sample_index", &pt_sample_index, py::arg("doc_lengths"), py::arg("doc_order"),
          py::arg("seq_length"), py::arg("num_samples") = -1,
          "Megatron-style sample index + per-window document boundaries (see pt_index.cpp).");
}

}  // namespace hpctrain
