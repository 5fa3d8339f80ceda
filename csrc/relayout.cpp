// Re-layout copy: one generic multi-threaded strided block copy, dst[...] = src[...] for a list of
// (dst, src) view pairs of equal shape and item size. Everything else (split / concat along a
// dimension, megatron's fused-QKV and gated-MLP interleavings) is a list of such pairs built in
// Python from numpy views (slicing a memory-mapped array is free), so no whole tensor is copied
// in Python. Bytes are copied raw: bf16 is just a 2-byte element.
//
// Each pair is reduced to "outer index space x contiguous inner run": trailing dimensions that
// are contiguous in both views are merged into one memcpy. The total byte count is split evenly
// across threads (a run may be split between two threads), and the GIL is released while copying.
#include <algorithm>
#include <cstring>
#include <string>
#include <thread>

#include "common.h"

namespace hpctrain {
namespace {

struct CopyJob {
    char* dst;
    const char* src;
    std::vector<int64_t> shape, dst_strides, src_strides;  // outer dimensions only
    int64_t run_bytes;   // contiguous bytes per outer index
    int64_t runs;        // product of outer shape
};

CopyJob make_job(const py::buffer_info& d, const py::buffer_info& s, size_t k) {
    const std::string where = "pair " + std::to_string(k) + ": ";
    if (d.readonly) throw std::invalid_argument(where + "destination is read-only");
    if (d.itemsize != s.itemsize) {
        throw py::type_error(where + "item sizes differ (dst " + std::to_string(d.itemsize) +
                             " bytes, src " + std::to_string(s.itemsize) + " bytes)");
    }
    if (d.shape != s.shape) throw std::invalid_argument(where + "shapes differ");
    CopyJob job{static_cast<char*>(d.ptr), static_cast<const char*>(s.ptr), {}, {}, {}, d.itemsize, 1};
    int nd = static_cast<int>(d.ndim);
    // Merge trailing dimensions while both views stay contiguous.
    while (nd > 0 && d.strides[nd - 1] == job.run_bytes && s.strides[nd - 1] == job.run_bytes) {
        job.run_bytes *= d.shape[nd - 1];
        --nd;
    }
    for (int i = 0; i < nd; ++i) {
        job.shape.push_back(d.shape[i]);
        job.dst_strides.push_back(d.strides[i]);
        job.src_strides.push_back(s.strides[i]);
        job.runs *= d.shape[i];
    }
    for (auto x : d.shape) {
        if (x == 0) job.runs = 0;
    }
    return job;
}

// Copies bytes [lo, hi) of the job's flattened (outer-major, run-minor) byte stream.
void copy_range(const CopyJob& job, int64_t lo, int64_t hi) {
    int64_t run = lo / job.run_bytes, within = lo % job.run_bytes;
    const int nd = static_cast<int>(job.shape.size());
    std::vector<int64_t> idx(nd);
    int64_t dst_off = 0, src_off = 0, rest = run;
    for (int i = nd - 1; i >= 0; --i) {
        idx[i] = rest % job.shape[i];
        rest /= job.shape[i];
        dst_off += idx[i] * job.dst_strides[i];
        src_off += idx[i] * job.src_strides[i];
    }
    int64_t pos = lo;
    while (pos < hi) {
        const int64_t n = std::min(job.run_bytes - within, hi - pos);
        std::memcpy(job.dst + dst_off + within, job.src + src_off + within, static_cast<size_t>(n));
        pos += n;
        within = 0;
        for (int i = nd - 1; i >= 0; --i) {  // advance the outer index like an odometer
            dst_off += job.dst_strides[i];
            src_off += job.src_strides[i];
            if (++idx[i] < job.shape[i]) break;
            dst_off -= job.shape[i] * job.dst_strides[i];
            src_off -= job.shape[i] * job.src_strides[i];
            idx[i] = 0;
        }
    }
}

// Thread t copies global bytes [t*total/threads, (t+1)*total/threads) across all jobs.
void copy_all(const std::vector<CopyJob>& jobs, int threads) {
    std::vector<int64_t> begin(jobs.size() + 1, 0);
    for (size_t j = 0; j < jobs.size(); ++j) begin[j + 1] = begin[j] + jobs[j].runs * jobs[j].run_bytes;
    const int64_t total = begin.back();
    if (total < (int64_t(1) << 20)) threads = 1;  // thread start-up costs more than small copies
    auto worker = [&](int t) {
        const int64_t lo = total * t / threads, hi = total * (t + 1) / threads;
        for (size_t j = 0; j < jobs.size(); ++j) {
            const int64_t a = std::max(lo, begin[j]), b = std::min(hi, begin[j + 1]);
            if (a < b) copy_range(jobs[j], a - begin[j], b - begin[j]);
        }
    };
    std::vector<std::thread> pool;
    for (int t = 1; t < threads; ++t) pool.emplace_back(worker, t);
    worker(0);
    for (auto& th : pool) th.join();
}

int64_t copy_views(const py::list& pairs, int threads) {
    if (threads < 1 || threads > 1024) {
        throw std::invalid_argument("threads must be in [1, 1024], got " + std::to_string(threads));
    }
    std::vector<py::buffer_info> infos;  // keeps every buffer exported until the copy is done
    infos.reserve(2 * pairs.size());
    std::vector<CopyJob> jobs;
    for (size_t k = 0; k < pairs.size(); ++k) {
        const std::string where = "pair " + std::to_string(k);
        if (!py::isinstance<py::tuple>(pairs[k]) || py::len(pairs[k]) != 2) {
            throw py::type_error(where + " is not a (dst, src) tuple");
        }
        auto pair = pairs[k].cast<py::tuple>();
        if (!py::isinstance<py::buffer>(pair[0]) || !py::isinstance<py::buffer>(pair[1])) {
            throw py::type_error(where + ": dst and src must support the buffer protocol (numpy arrays)");
        }
        infos.push_back(pair[0].cast<py::buffer>().request(true));
        infos.push_back(pair[1].cast<py::buffer>().request(false));
        jobs.push_back(make_job(infos[2 * k], infos[2 * k + 1], k));
    }
    int64_t total = 0;
    for (const auto& j : jobs) total += j.runs * j.run_bytes;
    {
        py::gil_scoped_release release;
        copy_all(jobs, threads);
    }
    return total;
}

// Plain contiguous memcpy split over threads: the bandwidth reference for the benchmark.
int64_t memcpy_threads(py::buffer dst, py::buffer src, int threads) {
    py::buffer_info d = dst.request(true), s = src.request(false);
    const int64_t n = d.size * d.itemsize;
    if (n != s.size * s.itemsize) throw std::invalid_argument("dst and src byte sizes differ");
    if (threads < 1) throw std::invalid_argument("threads must be >= 1");
    auto* dp = static_cast<char*>(d.ptr);
    const auto* sp = static_cast<const char*>(s.ptr);
    py::gil_scoped_release release;
    auto worker = [&](int t) {
        const int64_t lo = n * t / threads, hi = n * (t + 1) / threads;
        std::memcpy(dp + lo, sp + lo, static_cast<size_t>(hi - lo));
    };
    std::vector<std::thread> pool;
    for (int t = 1; t < threads; ++t) pool.emplace_back(worker, t);
    worker(0);
    for (auto& th : pool) th.join();
    return n;
}

}  // namespace

void register_relayout(py::module_& m) {
    m.def("copy_views", &copy_views, py::arg("pairs"), py::arg("threads") = 1,
          "Copy each (dst, src) buffer pair (same shape and item size, any strides); returns bytes copied.");
    m.def("memcpy_threads", &memcpy_threads, py::arg("dst"), py::arg("src"), py::arg("threads") = 1,
          "Raw memcpy of two contiguous buffers over `threads` threads (benchmark reference).");
}

}  // namespace hpctrain
