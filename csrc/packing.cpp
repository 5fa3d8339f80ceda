// Sequence packing: best-fit-decreasing bin packing of sample lengths into bins of `capacity`.
//
// Rule (the Python twin in hpctrain/native/twins.py follows it step by step):
//   1. Effective length = min(length, capacity) (longer samples are an error unless truncate).
//   2. Samples are visited by effective length, longest first; equal lengths by index, ascending.
//   3. Each sample goes to the open bin with the SMALLEST remaining capacity that still fits it.
//      Among bins with that same remaining capacity, the one that most recently reached it (LIFO).
//      If no bin fits, a new bin opens; bins are numbered in opening order.
// Output (CSR): order = sample indices grouped by bin (within a bin in placement order),
// bin_offsets[b] .. bin_offsets[b+1] delimit bin b in order.
//
// Cost: O(n + capacity) for the counting sort plus O(n log64 capacity) for the placements; the
// "balanced structure over remaining capacities" is a 64-ary bitset tree over the values
// 0..capacity (find the next non-empty capacity class >= length in 3-4 word operations),
// with an intrusive LIFO list of bins per class.
#include <algorithm>
#include <string>

#include "common.h"

namespace hpctrain {
namespace {

constexpr int64_t kMaxCapacity = int64_t(1) << 24;  // memory is O(capacity): 16 bytes per value

// Set of integers in [0, n) with "smallest member >= i" in O(log64 n).
class NextSet {
  public:
    explicit NextSet(size_t n) {
        size_t m = n;
        do {
            m = (m + 63) / 64;
            levels_.emplace_back(m, 0);
        } while (m > 1);
    }
    void insert(size_t i) {
        for (auto& words : levels_) {
            const bool was_empty = words[i >> 6] == 0;
            words[i >> 6] |= uint64_t(1) << (i & 63);
            if (!was_empty) return;
            i >>= 6;
        }
    }
    void erase(size_t i) {
        for (auto& words : levels_) {
            words[i >> 6] &= ~(uint64_t(1) << (i & 63));
            if (words[i >> 6] != 0) return;
            i >>= 6;
        }
    }
    // Smallest member >= i, or -1.
    int64_t next(size_t i) const {
        for (size_t k = 0; k < levels_.size(); ++k) {
            const size_t w = i >> 6;
            if (w >= levels_[k].size()) return -1;
            const uint64_t bits = levels_[k][w] & (~uint64_t(0) << (i & 63));
            if (bits) {
                size_t j = (w << 6) + __builtin_ctzll(bits);
                while (k > 0) {
                    --k;
                    j = (j << 6) + __builtin_ctzll(levels_[k][j]);
                }
                return static_cast<int64_t>(j);
            }
            i = w + 1;
        }
        return -1;
    }

  private:
    std::vector<std::vector<uint64_t>> levels_;
};

struct PackResult {
    std::vector<int64_t> bin_offsets;
    std::vector<int64_t> order;
};

// One pass: validate and histogram the effective lengths (count[capacity - length + 1]).
template <typename T>
std::vector<int64_t> histogram(const T* len, int64_t n, int64_t capacity, bool truncate) {
    std::vector<int64_t> start(capacity + 2, 0);
    int64_t too_long = 0, longest = 0, longest_at = -1;
    for (int64_t i = 0; i < n; ++i) {
        const int64_t v = len[i];
        if (v < 0) {
            throw std::invalid_argument("lengths[" + std::to_string(i) + "] = " + std::to_string(v) +
                                        " is negative; sample lengths must be >= 0");
        }
        if (v > capacity) {
            ++too_long;
            if (v > longest) longest = v, longest_at = i;
            ++start[1];
        } else {
            ++start[capacity - v + 1];
        }
    }
    if (too_long && !truncate) {
        throw std::invalid_argument(
            std::to_string(too_long) + " sample(s) are longer than the capacity " +
            std::to_string(capacity) + " (longest: lengths[" + std::to_string(longest_at) +
            "] = " + std::to_string(longest) +
            "); raise the capacity (max_length / packing_length) or pass truncate=True");
    }
    return start;
}

// Counting sort: sample indices by effective length descending, index ascending within a length.
// On return start[c] is where effective length capacity - c begins in `sorted` (c = 0..capacity+1).
template <typename T>
std::vector<int64_t> sort_decreasing(const T* len, int64_t n, int64_t capacity, std::vector<int64_t>& start) {
    for (int64_t k = 1; k < capacity + 2; ++k) start[k] += start[k - 1];
    std::vector<int64_t> cursor(start.begin(), start.end() - 1);
    std::vector<int64_t> sorted(n);
    for (int64_t i = 0; i < n; ++i) sorted[cursor[capacity - std::min<int64_t>(len[i], capacity)]++] = i;
    return sorted;
}

template <typename T>
PackResult pack(const T* len, int64_t n, int64_t capacity, bool truncate) {
    std::vector<int64_t> start = histogram(len, n, capacity, truncate);
    const std::vector<int64_t> sorted = sort_decreasing(len, n, capacity, start);
    NextSet classes(static_cast<size_t>(capacity) + 1);
    std::vector<int64_t> head(capacity + 1, -1);  // capacity class -> most recent bin in it
    std::vector<int64_t> next_in_class, remaining, bin_size;
    std::vector<int64_t> placed_bin(n);
    int64_t k = 0;
    for (int64_t c = 0; c <= capacity; ++c) {      // lengths capacity, capacity-1, ..., 0
        const int64_t length = capacity - c;
        for (; k < start[c + 1]; ++k) {
            const int64_t r = classes.next(static_cast<size_t>(length));
            int64_t b;
            if (r < 0) {
                b = static_cast<int64_t>(remaining.size());
                remaining.push_back(capacity - length);
                next_in_class.push_back(-1);
                bin_size.push_back(0);
            } else {
                b = head[r];
                head[r] = next_in_class[b];
                if (head[r] < 0) classes.erase(static_cast<size_t>(r));
                remaining[b] = r - length;
            }
            const int64_t rb = remaining[b];
            if (head[rb] < 0) classes.insert(static_cast<size_t>(rb));
            next_in_class[b] = head[rb];
            head[rb] = b;
            placed_bin[k] = b;
            ++bin_size[b];
        }
    }
    PackResult out;
    out.bin_offsets.assign(bin_size.size() + 1, 0);
    for (size_t b = 0; b < bin_size.size(); ++b) out.bin_offsets[b + 1] = out.bin_offsets[b] + bin_size[b];
    std::vector<int64_t> cursor(out.bin_offsets.begin(), out.bin_offsets.end() - 1);
    out.order.resize(n);
    for (int64_t j = 0; j < n; ++j) out.order[cursor[placed_bin[j]]++] = sorted[j];
    return out;
}

py::tuple pack_sequences(const py::array& lengths, int64_t capacity, bool truncate) {
    if (capacity <= 0 || capacity > kMaxCapacity) {
        throw std::invalid_argument("capacity must be in [1, " + std::to_string(kMaxCapacity) +
                                    "], got " + std::to_string(capacity));
    }
    const IntArray len = int_array(lengths, "lengths");
    PackResult res;
    {
        py::gil_scoped_release release;
        res = with_int_type(len, [&](auto* p) { return pack(p, len.size, capacity, truncate); });
    }
    const auto nb = static_cast<py::ssize_t>(res.bin_offsets.size());
    const auto n = static_cast<py::ssize_t>(res.order.size());
    return py::make_tuple(to_numpy(std::move(res.bin_offsets), {nb}), to_numpy(std::move(res.order), {n}));
}

}  // namespace

void register_packing(py::module_& m) {
    m.def("pack_sequences", &pack_sequences, py::arg("lengths"), py::arg("capacity"),
          py::arg("truncate") = false,
          "Best-fit-decreasing packing; returns (bin_offsets int64[nbins+1], order int64[n]).");
}

}  // namespace hpctrain
