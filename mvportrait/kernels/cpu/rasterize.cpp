// CPU rasterizer for mvportrait: the C++ fast path of mvportrait.kernels.rasterize.
//
// Reproduces rasterize_ref exactly (see the docstring of mvportrait/kernels/rasterize.py): the
// same float64 operations in the same order for the triangle setup, the edge functions (edge i
// opposite vertex i, endpoints in canonical order = lower vertex index first), the top-left rule,
// the perspective-correct barycentrics and the depth, so triangle ids, coverage, depth and
// barycentrics agree bit for bit with the reference's float64 values before the final cast.
// Build with -ffp-contract=off so no multiply-add is fused (fusing would change the rounding).
//
// Work split:
//   0. vertex  tasks (view): u, v, z as float64 and 1 / z per vertex;
//   1. setup   tasks (view, chunk of faces): per kept triangle its edge coefficients and bbox;
//   2. binning tasks (view): ids of kept triangles per block of rows, ascending face id;
//   3. raster  tasks (view, block of rows): a private z-buffer for the block (face id and the
//      perspective weights q0, q1, q2, qs per pixel, depth = 1 / qs); triangles in ascending face
//      id. Coverage loops append the covered (pixel, face, edge values) to a fragment queue; a
//      flush computes the weights of the queued fragments with full vectors (the divider is the
//      bottleneck, so only covered pixels use it) and runs the depth tests in queue order,
//      strict => exact depth ties keep the lowest face id. Then the block's rows of every output
//      are written (bary = q / qs, depth = 1 / qs; empty pixels -1 / 0 / false).
// Tasks are handed out through an atomic counter to a process-wide pool of std::threads (the
// calling thread works too); the GIL is released meanwhile.
// Coverage: small triangles (box <= 8 columns, <= 32 pixels in the block) take every box pixel
// as a lane, four per step (AVX2, compacting the covered lanes with a permute); the others run
// a row loop of two pixel centres per step (SSE2, the column terms computed once per triangle).
// Every vector path does lane by lane the same IEEE operations as the scalar loop (which other
// architectures use, and simd=False). The AVX / AVX2 code is compiled with function target
// attributes and chosen at run time (__builtin_cpu_supports), so the build needs no -march.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>
#ifndef _WIN32
#include <unistd.h>
#endif
#if defined(__SSE2__) || defined(_M_X64)
#include <emmintrin.h>
#define MVP_HAVE_SSE2 1
#else
#define MVP_HAVE_SSE2 0
#endif
// 256-bit AVX code paths, compiled for AVX by a function attribute and picked at run time
// (__builtin_cpu_supports), so the default build stays portable (no -march).
#if MVP_HAVE_SSE2 && (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define MVP_HAVE_AVX 1
#define MVP_AVX __attribute__((target("avx")))
#define MVP_AVX2 __attribute__((target("avx2,popcnt")))
#else
#define MVP_HAVE_AVX 0
#endif

namespace py = pybind11;

namespace {

struct Tri {
  // oriented edge i at pixel centre p: sdx[i] * (p_v - ay[i]) - sdy[i] * (p_u - ax[i]); inside => > 0
  double ax[3], ay[3], sdx[3], sdy[3], inv_z[3];
  int32_t r0, r1, c0, c1;  // inclusive clipped bounding box (rows, columns)
  uint32_t owner;          // bit i: edge i owns the pixels exactly on it (top-left rule)
};

// A process-wide pool of sleeping worker threads. parallel_for() publishes a job; the caller
// works on it too, and waits only for the workers that actually joined it. A worker that was
// not scheduled in time (a busy machine) simply misses the job, so an oversubscribed machine
// costs at most the tasks already claimed, never a wait for a thread to start. The pool is
// leaked on purpose (no join at interpreter exit) and rebuilt in a forked child.
// A worker that finished a job spins for a short while (kSpinUs) before it sleeps, and the
// caller spins briefly for the workers still on their last task: a rasterize call is a few
// jobs in a row, and a futex wake-up per job would cost more than the shorter jobs themselves.
class Pool {
 public:
  static Pool& get() {
    static std::mutex make_mutex;
    static Pool* pool = nullptr;
    std::lock_guard<std::mutex> lock(make_mutex);
#ifndef _WIN32
    if (pool && pool->pid_ != getpid()) pool = nullptr;  // forked child: the threads are gone
#endif
    if (!pool) pool = new Pool();
    return *pool;
  }

  template <typename Fn>
  void run(int64_t ntasks, int nthreads, Fn& fn) {
    std::lock_guard<std::mutex> serial(run_mutex_);  // one job at a time (calls from several threads)
    ensure_workers(nthreads - 1);
    std::function<void(int64_t)> body = [&fn](int64_t t) { fn(t); };
    {
      std::lock_guard<std::mutex> lock(mutex_);
      body_ = &body;
      ntasks_ = ntasks;
      next_.store(0);
      error_ = nullptr;
      open_ = true;
      seats_ = nthreads - 1;
      ++generation_;
    }
    published_.store(generation_, std::memory_order_release);
    wake_.notify_all();
    work(body, ntasks);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      open_ = false;  // every task is claimed: latecomers stay out
    }
    spin_until([this] { return busy_.load(std::memory_order_acquire) == 0; });
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return participants_ == 0; });
    body_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  Pool() {
#ifndef _WIN32
    pid_ = getpid();
#endif
  }

  static constexpr int kSpinUs = 100;

  // Busy-wait until done() or about kSpinUs microseconds have passed; true if done.
  template <typename Done>
  static bool spin_until(Done done) {
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0;; ++i) {
      if (done()) return true;
#if MVP_HAVE_SSE2
      _mm_pause();
#endif
      if ((i & 63) == 63 && std::chrono::steady_clock::now() - start > std::chrono::microseconds(kSpinUs))
        return done();
    }
  }

  void ensure_workers(int n) {
    std::lock_guard<std::mutex> lock(mutex_);
    while (static_cast<int>(workers_) < n) {
      std::thread(&Pool::loop, this).detach();
      ++workers_;
    }
  }

  void work(const std::function<void(int64_t)>& body, int64_t ntasks) {
    try {
      for (int64_t t = next_.fetch_add(1); t < ntasks; t = next_.fetch_add(1)) body(t);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
      next_.store(ntasks);
    }
  }

  void loop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      if (generation_ == seen) {  // no new job yet: spin a little before sleeping
        lock.unlock();
        spin_until([&] { return published_.load(std::memory_order_acquire) != seen; });
        lock.lock();
      }
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (!open_ || seats_ <= 0) continue;
      --seats_;
      ++participants_;
      busy_.fetch_add(1, std::memory_order_relaxed);
      const std::function<void(int64_t)>* body = body_;
      const int64_t ntasks = ntasks_;
      lock.unlock();
      work(*body, ntasks);
      lock.lock();
      busy_.fetch_sub(1, std::memory_order_release);
      if (--participants_ == 0) done_.notify_all();
    }
  }

  std::mutex run_mutex_, mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int64_t)>* body_ = nullptr;
  int64_t ntasks_ = 0;
  std::atomic<int64_t> next_{0};
  std::exception_ptr error_;
  bool open_ = false;
  int seats_ = 0, participants_ = 0;
  unsigned workers_ = 0;
  uint64_t generation_ = 0;
  std::atomic<uint64_t> published_{0};  // generation_, readable without the lock (spinning workers)
  std::atomic<int> busy_{0};            // participants_, readable without the lock (spinning caller)
#ifndef _WIN32
  pid_t pid_ = 0;
#endif
};

// Run fn(task) for task in [0, ntasks) on up to nthreads threads (the caller is one of them).
template <typename Fn>
void parallel_for(int64_t ntasks, int nthreads, Fn&& fn) {
  if (ntasks <= 0) return;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, ntasks)));
  if (nt == 1) {
    for (int64_t t = 0; t < ntasks; ++t) fn(t);
    return;
  }
  Pool::get().run(ntasks, nt, fn);
}

int resolve_threads(int requested) {
  if (requested > 0) return requested;
  const unsigned hc = std::thread::hardware_concurrency();
  return hc ? static_cast<int>(hc) : 1;
}

// Per vertex of one view: u, v, z as float64 and 1 / z (the reference's ``1.0 / z``).
struct Vtx {
  double u, v, z, inv_z;
};

// floor / ceil of a finite double in [-2, 2^31] as an integer (x86-64 baseline has no roundsd).
inline int64_t floor_i(double x) {
  const int64_t i = static_cast<int64_t>(x);  // truncates toward zero
  return static_cast<double>(i) > x ? i - 1 : i;
}
inline int64_t ceil_i(double x) {
  const int64_t i = static_cast<int64_t>(x);
  return static_cast<double>(i) < x ? i + 1 : i;
}

// Triangle setup; false when the triangle is dropped. Mirrors _setup() in rasterize.py.
inline bool setup_tri(const Vtx* vx, const int64_t* fv, int64_t height, int64_t width, bool cull, double near,
                      Tri& t) {
  const Vtx &p0 = vx[fv[0]], &p1 = vx[fv[1]], &p2 = vx[fv[2]];
  if (!(p0.z > near && p1.z > near && p2.z > near)) return false;
  const double u[3] = {p0.u, p1.u, p2.u}, v[3] = {p0.v, p1.v, p2.v};
  const double area2 = (u[1] - u[0]) * (v[2] - v[0]) - (v[1] - v[0]) * (u[2] - u[0]);
  if (area2 == 0.0) return false;
  if (cull && !(area2 < 0.0)) return false;
  // Pixel columns j whose centre j + 0.5 lies in [umin, umax] (clamped first, as the reference).
  const double umin = std::min(std::min(u[0], u[1]), u[2]), umax = std::max(std::max(u[0], u[1]), u[2]);
  const double vmin = std::min(std::min(v[0], v[1]), v[2]), vmax = std::max(std::max(v[0], v[1]), v[2]);
  const double wlim = static_cast<double>(width) + 1.0, hlim = static_cast<double>(height) + 1.0;
  const int64_t c0 = std::max<int64_t>(0, ceil_i(std::clamp(umin, -1.0, wlim) - 0.5));
  const int64_t c1 = std::min<int64_t>(width - 1, floor_i(std::clamp(umax, -1.0, wlim) - 0.5));
  const int64_t r0 = std::max<int64_t>(0, ceil_i(std::clamp(vmin, -1.0, hlim) - 0.5));
  const int64_t r1 = std::min<int64_t>(height - 1, floor_i(std::clamp(vmax, -1.0, hlim) - 0.5));
  if (c0 > c1 || r0 > r1) return false;
  const double orient = area2 > 0.0 ? 1.0 : -1.0;
  t.owner = 0;
  for (int i = 0; i < 3; ++i) {
    const int j = (i + 1) % 3, k = (i + 2) % 3;
    const bool swap = fv[j] > fv[k];  // canonical order: lower vertex id first
    const double ax = swap ? u[k] : u[j], ay = swap ? v[k] : v[j];
    const double bx = swap ? u[j] : u[k], by = swap ? v[j] : v[k];
    const double sign = (swap ? -1.0 : 1.0) * orient;
    t.ax[i] = ax;
    t.ay[i] = ay;
    t.sdx[i] = sign * (bx - ax);
    t.sdy[i] = sign * (by - ay);
    const double du = orient * (u[k] - u[j]), dv = orient * (v[k] - v[j]);
    if (dv < 0.0 || (dv == 0.0 && du > 0.0)) t.owner |= 1u << i;
  }
  t.inv_z[0] = p0.inv_z;
  t.inv_z[1] = p1.inv_z;
  t.inv_z[2] = p2.inv_z;
  t.r0 = static_cast<int32_t>(r0);
  t.r1 = static_cast<int32_t>(r1);
  t.c0 = static_cast<int32_t>(c0);
  t.c1 = static_cast<int32_t>(c1);
  return true;
}

// Pixel centre inside (top-left rule for centres exactly on an edge) given the oriented edge values.
inline bool inside3(const double e[3], uint32_t owner) {
  return (e[0] > 0.0 || (e[0] == 0.0 && (owner & 1u))) && (e[1] > 0.0 || (e[1] == 0.0 && (owner & 2u))) &&
         (e[2] > 0.0 || (e[2] == 0.0 && (owner & 4u)));
}

// Perspective weights q_i = s_i / z_i of the screen barycentrics s_i = e_i / sum(e), and their
// sum qs: depth = 1 / qs, bary_i = q_i / qs -- the operations of _bary_depth() in rasterize.py,
// with the divisions by qs deferred to the pixels that end up visible.
inline double persp_weights(const double e[3], const double inv_z[3], double q[3]) {
  const double s = std::max((e[0] + e[1]) + e[2], std::numeric_limits<double>::min());
  q[0] = (e[0] / s) * inv_z[0];
  q[1] = (e[1] / s) * inv_z[1];
  q[2] = (e[2] / s) * inv_z[2];
  return (q[0] + q[1]) + q[2];
}

// Z-buffer of one block of rows, structure of arrays with a padded row stride (two spare
// columns, so a two-pixel step that starts on the last column stays inside): per pixel the
// winning face id as a double (-1 = none; face ids < 2^31 are exact), its perspective weights
// q0, q1, q2 and their sum qs (depth = 1 / qs; -1 where empty, below any real qs >= 0). All
// five arrays are doubles so one lane mask blends them alike.
struct Block {
  double *id, *q0, *q1, *q2, *qs;
  int64_t stride;
};

// Depth test of face f (as a double) at block pixel p. Replace iff the pixel is empty or
// 1/qs < 1/qs_cur, strictly: faces arrive in ascending id, so exact depth ties keep the lowest
// id. Rounding is monotone, so qs <= qs_cur can never win and the two divisions are only needed
// when qs > qs_cur on an occupied pixel.
inline void depth_test(Block& zb, int64_t p, double f, double q0, double q1, double q2, double qs) {
  const double cur = zb.qs[p];
  if (cur < 0.0 || (qs > cur && 1.0 / qs < 1.0 / cur)) {
    zb.id[p] = f;
    zb.q0[p] = q0;
    zb.q1[p] = q1;
    zb.q2[p] = q2;
    zb.qs[p] = qs;
  }
}

// Rows [ra, rb] of triangle t (face f) into the block starting at row0; scalar reference loop.
// Edge value at (px, py): rt_i - ct_i with the row term rt_i = sdx_i * (py - ay_i) and the column
// term ct_i = sdy_i * (px - ax_i), each one correctly rounded op as in the reference.
void raster_rows_scalar(const Tri& t, double f, int64_t ra, int64_t rb, int64_t row0, Block& zb) {
  const double ax0 = t.ax[0], ax1 = t.ax[1], ax2 = t.ax[2], ay0 = t.ay[0], ay1 = t.ay[1], ay2 = t.ay[2];
  const double sx0 = t.sdx[0], sx1 = t.sdx[1], sx2 = t.sdx[2], sy0 = t.sdy[0], sy1 = t.sdy[1], sy2 = t.sdy[2];
  const uint32_t owner = t.owner;
  const int64_t c0 = t.c0, c1 = t.c1;
  for (int64_t r = ra; r <= rb; ++r) {
    const double py = static_cast<double>(r) + 0.5;
    const double rt0 = sx0 * (py - ay0), rt1 = sx1 * (py - ay1), rt2 = sx2 * (py - ay2);
    const int64_t line = (r - row0) * zb.stride;
    bool entered = false;
    for (int64_t c = c0; c <= c1; ++c) {
      const double px = static_cast<double>(c) + 0.5;
      const double e[3] = {rt0 - sy0 * (px - ax0), rt1 - sy1 * (px - ax1), rt2 - sy2 * (px - ax2)};
      if (!inside3(e, owner)) {
        // edge values are monotone along a row (rounding is monotone), so the covered columns
        // of a row are contiguous: past them, the row is done
        if (entered) break;
        continue;
      }
      entered = true;
      double q[3];
      const double qs = persp_weights(e, t.inv_z, q);
      depth_test(zb, line + c, f, q[0], q[1], q[2], qs);
    }
  }
}

#if MVP_HAVE_SSE2
// Fragments (covered pixel, triangle) of one block waiting for their perspective weights, in
// the order they were produced (ascending face id, so the in-order depth tests below keep the
// reference's tie rule). The weights of a batch are computed with full vectors (AVX when the
// CPU has it), which keeps the divider -- the bottleneck -- busy with covered pixels only.
struct FragQueue {
  static constexpr int kCap = 512;
  // block pixel index and face id as doubles (exact integers below 2^53): one permute compacts
  // every field alike in the AVX2 path
  alignas(32) double e0[kCap + 8], e1[kCap + 8], e2[kCap + 8], iz0[kCap + 8], iz1[kCap + 8], iz2[kCap + 8],
      qs[kCap + 8], pix[kCap + 8], face[kCap + 8];
  int n = 0;
};

// q_i = (e_i / s) * iz_i in place of e_i and qs = (q0 + q1) + q2 for fragments [0, n) (and a few
// stale ones past n, harmless): persp_weights() lane by lane.
void frag_weights_sse2(FragQueue& fq) {
  const __m128d tiny = _mm_set1_pd(std::numeric_limits<double>::min());
  for (int k = 0; k < fq.n; k += 2) {
    const __m128d e0 = _mm_load_pd(fq.e0 + k), e1 = _mm_load_pd(fq.e1 + k), e2 = _mm_load_pd(fq.e2 + k);
    const __m128d s = _mm_max_pd(_mm_add_pd(_mm_add_pd(e0, e1), e2), tiny);
    const __m128d w0 = _mm_mul_pd(_mm_div_pd(e0, s), _mm_load_pd(fq.iz0 + k));
    const __m128d w1 = _mm_mul_pd(_mm_div_pd(e1, s), _mm_load_pd(fq.iz1 + k));
    const __m128d w2 = _mm_mul_pd(_mm_div_pd(e2, s), _mm_load_pd(fq.iz2 + k));
    _mm_store_pd(fq.e0 + k, w0);
    _mm_store_pd(fq.e1 + k, w1);
    _mm_store_pd(fq.e2 + k, w2);
    _mm_store_pd(fq.qs + k, _mm_add_pd(_mm_add_pd(w0, w1), w2));
  }
}

#if MVP_HAVE_AVX
MVP_AVX void frag_weights_avx(FragQueue& fq) {
  const __m256d tiny = _mm256_set1_pd(std::numeric_limits<double>::min());
  for (int k = 0; k < fq.n; k += 4) {
    const __m256d e0 = _mm256_load_pd(fq.e0 + k), e1 = _mm256_load_pd(fq.e1 + k), e2 = _mm256_load_pd(fq.e2 + k);
    const __m256d s = _mm256_max_pd(_mm256_add_pd(_mm256_add_pd(e0, e1), e2), tiny);
    const __m256d w0 = _mm256_mul_pd(_mm256_div_pd(e0, s), _mm256_load_pd(fq.iz0 + k));
    const __m256d w1 = _mm256_mul_pd(_mm256_div_pd(e1, s), _mm256_load_pd(fq.iz1 + k));
    const __m256d w2 = _mm256_mul_pd(_mm256_div_pd(e2, s), _mm256_load_pd(fq.iz2 + k));
    _mm256_store_pd(fq.e0 + k, w0);
    _mm256_store_pd(fq.e1 + k, w1);
    _mm256_store_pd(fq.e2 + k, w2);
    _mm256_store_pd(fq.qs + k, _mm256_add_pd(_mm256_add_pd(w0, w1), w2));
  }
}
#endif

// Weights of the queued fragments, then their depth tests in queue order; empties the queue.
inline void flush(FragQueue& fq, Block& zb, bool avx) {
#if MVP_HAVE_AVX
  if (avx)
    frag_weights_avx(fq);
  else
#endif
    frag_weights_sse2(fq);
  (void)avx;
  for (int k = 0; k < fq.n; ++k)
    depth_test(zb, static_cast<int64_t>(fq.pix[k]), fq.face[k], fq.e0[k], fq.e1[k], fq.e2[k], fq.qs[k]);
  fq.n = 0;
}

// Inside test of one edge, the top-left rule resolved at compile time: e > 0, or e >= 0 for an
// edge that owns its pixels.
template <bool OWN>
inline __m128d edge_in(__m128d e, __m128d zero) {
  return OWN ? _mm_cmpge_pd(e, zero) : _mm_cmpgt_pd(e, zero);
}

// Same coverage as raster_rows_scalar, two pixel centres (columns c, c + 1) per step. The column
// terms of the bounding box are computed once per triangle (ct, 3 per step), so a step costs
// three subtractions and three compares; covered pixels go to the fragment queue (flushed when
// full). OWN: the owner bits (edge i owns bit i).
//
// NS > 0: the box is exactly NS steps wide (the common small triangle): every step of a row is
// evaluated with no early exit and the lanes are appended without branches (a lane that is not
// covered is written and then overwritten), which spares the row loop its mispredicted branches.
// NS = 0: any width; a row stops after its covered run.
template <unsigned OWN, int NS>
void raster_rows_sse2(const Tri& t, int32_t f, int64_t ra, int64_t rb, int64_t row0, Block& zb, __m128d* ct,
                      FragQueue& fq, bool avx) {
  const int64_t c0 = t.c0, c1 = t.c1;
  const int64_t nsteps = NS > 0 ? NS : (c1 - c0 + 2) >> 1;
  {
    const __m128d ax0 = _mm_set1_pd(t.ax[0]), ax1 = _mm_set1_pd(t.ax[1]), ax2 = _mm_set1_pd(t.ax[2]);
    const __m128d sy0 = _mm_set1_pd(t.sdy[0]), sy1 = _mm_set1_pd(t.sdy[1]), sy2 = _mm_set1_pd(t.sdy[2]);
    __m128d px = _mm_add_pd(_mm_set1_pd(static_cast<double>(c0)), _mm_set_pd(1.5, 0.5));  // exact
    const __m128d two = _mm_set1_pd(2.0);
    for (int64_t k = 0; k < nsteps; ++k) {
      ct[3 * k] = _mm_mul_pd(sy0, _mm_sub_pd(px, ax0));
      ct[3 * k + 1] = _mm_mul_pd(sy1, _mm_sub_pd(px, ax1));
      ct[3 * k + 2] = _mm_mul_pd(sy2, _mm_sub_pd(px, ax2));
      px = _mm_add_pd(px, two);  // integers + 0.5 below 2^52: exact
    }
  }
  const __m128d zero = _mm_setzero_pd();
  const double iz0 = t.inv_z[0], iz1 = t.inv_z[1], iz2 = t.inv_z[2];
  const int lastbits = ((c1 - c0) & 1) ? 3 : 1;  // the high lane of the last step may lie past the box
  const double sx0 = t.sdx[0], sx1 = t.sdx[1], sx2 = t.sdx[2], ay0 = t.ay[0], ay1 = t.ay[1], ay2 = t.ay[2];
  for (int64_t r = ra; r <= rb; ++r) {
    const double py = static_cast<double>(r) + 0.5;
    const __m128d rt0 = _mm_set1_pd(sx0 * (py - ay0)), rt1 = _mm_set1_pd(sx1 * (py - ay1)),
                  rt2 = _mm_set1_pd(sx2 * (py - ay2));
    const int64_t line = (r - row0) * zb.stride + c0;
    if (NS > 0) {
      if (fq.n > FragQueue::kCap - 2 * NS) flush(fq, zb, avx);
      int n = fq.n;
      for (int k = 0; k < NS; ++k) {
        const __m128d e0 = _mm_sub_pd(rt0, ct[3 * k]);
        const __m128d e1 = _mm_sub_pd(rt1, ct[3 * k + 1]);
        const __m128d e2 = _mm_sub_pd(rt2, ct[3 * k + 2]);
        const __m128d in = _mm_and_pd(
            _mm_and_pd(edge_in<(OWN & 1u) != 0>(e0, zero), edge_in<(OWN & 2u) != 0>(e1, zero)),
            edge_in<(OWN & 4u) != 0>(e2, zero));
        int bits = _mm_movemask_pd(in);
        if (k == NS - 1) bits &= lastbits;
        const int64_t p = line + 2 * k;
        _mm_storel_pd(fq.e0 + n, e0);
        _mm_storel_pd(fq.e1 + n, e1);
        _mm_storel_pd(fq.e2 + n, e2);
        fq.iz0[n] = iz0;
        fq.iz1[n] = iz1;
        fq.iz2[n] = iz2;
        fq.pix[n] = static_cast<double>(p);
        fq.face[n] = f;
        n += bits & 1;
        _mm_storeh_pd(fq.e0 + n, e0);
        _mm_storeh_pd(fq.e1 + n, e1);
        _mm_storeh_pd(fq.e2 + n, e2);
        fq.iz0[n] = iz0;
        fq.iz1[n] = iz1;
        fq.iz2[n] = iz2;
        fq.pix[n] = static_cast<double>(p + 1);
        fq.face[n] = f;
        n += bits >> 1;
      }
      fq.n = n;
      continue;
    }
    bool entered = false;
    for (int64_t k = 0; k < nsteps; ++k) {
      const __m128d e0 = _mm_sub_pd(rt0, ct[3 * k]);
      const __m128d e1 = _mm_sub_pd(rt1, ct[3 * k + 1]);
      const __m128d e2 = _mm_sub_pd(rt2, ct[3 * k + 2]);
      const __m128d in = _mm_and_pd(
          _mm_and_pd(edge_in<(OWN & 1u) != 0>(e0, zero), edge_in<(OWN & 2u) != 0>(e1, zero)),
          edge_in<(OWN & 4u) != 0>(e2, zero));
      int bits = _mm_movemask_pd(in);
      if (k == nsteps - 1) bits &= lastbits;
      if (!bits) {
        if (entered) break;  // the covered columns of a row are contiguous (see the scalar loop)
        continue;
      }
      entered = true;
      // append the covered lanes (branch-free: write both, advance by the lane's bit)
      const int64_t p = line + 2 * k;
      int n = fq.n;
      const int b0 = bits & 1, b1 = bits >> 1;
      _mm_storel_pd(fq.e0 + n, e0);
      _mm_storel_pd(fq.e1 + n, e1);
      _mm_storel_pd(fq.e2 + n, e2);
      fq.iz0[n] = iz0;
      fq.iz1[n] = iz1;
      fq.iz2[n] = iz2;
      fq.pix[n] = static_cast<double>(p);
      fq.face[n] = f;
      n += b0;
      _mm_storeh_pd(fq.e0 + n, e0);
      _mm_storeh_pd(fq.e1 + n, e1);
      _mm_storeh_pd(fq.e2 + n, e2);
      fq.iz0[n] = iz0;
      fq.iz1[n] = iz1;
      fq.iz2[n] = iz2;
      fq.pix[n] = static_cast<double>(p + 1);
      fq.face[n] = f;
      n += b1;
      fq.n = n;
      if (n >= FragQueue::kCap) flush(fq, zb, avx);
      if (!b1) break;  // the high lane is past the covered run (or the box): row done
    }
  }
}

#if MVP_HAVE_AVX
// Small triangles (box at most kTinyW columns wide, at most kTinyN pixels in the block): every
// pixel of the box is a lane, four per step, rows and columns alike, so a triangle costs a few
// steps with no row structure. Edge values per lane: sdx_i * (py - ay_i) - sdy_i * (px - ax_i), the
// same correctly rounded operations as the row loops. Covered lanes are compacted into the
// fragment queue with one permute per field (AVX2). The caller makes room for kTinyN fragments.
constexpr int kTinyW = 8, kTinyN = 32;

struct TinyTables {
  alignas(32) double dx[kTinyW + 1][kTinyN], dy[kTinyW + 1][kTinyN];  // lane k of a box w wide: (k % w, k / w)
  alignas(32) int32_t perm[16][8];  // 32-bit lane indices that move the set lanes of a 4-bit mask to the front
  TinyTables() {
    for (int w = 1; w <= kTinyW; ++w)
      for (int k = 0; k < kTinyN; ++k) {
        dx[w][k] = k % w;
        dy[w][k] = k / w;
      }
    for (int b = 0; b < 16; ++b) {
      int j = 0;
      for (int l = 0; l < 4; ++l)
        if (b >> l & 1) {
          perm[b][2 * j] = 2 * l;
          perm[b][2 * j + 1] = 2 * l + 1;
          ++j;
        }
      for (; j < 4; ++j) perm[b][2 * j] = perm[b][2 * j + 1] = 0;
    }
  }
};
const TinyTables kTiny;

template <bool OWN>
MVP_AVX2 inline __m256d edge_in4(__m256d e, __m256d zero) {
  return OWN ? _mm256_cmp_pd(e, zero, _CMP_GE_OQ) : _mm256_cmp_pd(e, zero, _CMP_GT_OQ);
}

template <unsigned OWN>
MVP_AVX2 void raster_tiny_avx2(const Tri& t, int32_t f, int64_t ra, int64_t rb, int64_t row0, Block& zb,
                               FragQueue& fq) {
  const int w = t.c1 - t.c0 + 1;
  const int m = w * static_cast<int>(rb - ra + 1);
  const double* dxp = kTiny.dx[w];
  const double* dyp = kTiny.dy[w];
  const __m256d cx = _mm256_set1_pd(static_cast<double>(t.c0) + 0.5), cy = _mm256_set1_pd(static_cast<double>(ra) + 0.5);
  const __m256d ax0 = _mm256_set1_pd(t.ax[0]), ax1 = _mm256_set1_pd(t.ax[1]), ax2 = _mm256_set1_pd(t.ax[2]);
  const __m256d ay0 = _mm256_set1_pd(t.ay[0]), ay1 = _mm256_set1_pd(t.ay[1]), ay2 = _mm256_set1_pd(t.ay[2]);
  const __m256d sx0 = _mm256_set1_pd(t.sdx[0]), sx1 = _mm256_set1_pd(t.sdx[1]), sx2 = _mm256_set1_pd(t.sdx[2]);
  const __m256d sy0 = _mm256_set1_pd(t.sdy[0]), sy1 = _mm256_set1_pd(t.sdy[1]), sy2 = _mm256_set1_pd(t.sdy[2]);
  const __m256d iz0 = _mm256_set1_pd(t.inv_z[0]), iz1 = _mm256_set1_pd(t.inv_z[1]), iz2 = _mm256_set1_pd(t.inv_z[2]);
  const __m256d fid = _mm256_set1_pd(static_cast<double>(f)), zero = _mm256_setzero_pd();
  const __m256d stride = _mm256_set1_pd(static_cast<double>(zb.stride));
  // block pixel index of lane (dx, dy): base + dy * stride + dx, exact in doubles
  const __m256d base = _mm256_set1_pd(static_cast<double>((ra - row0) * zb.stride + t.c0));
  int n = fq.n;
  for (int k = 0; k < m; k += 4) {
    const __m256d dx = _mm256_load_pd(dxp + k), dy = _mm256_load_pd(dyp + k);
    const __m256d px = _mm256_add_pd(cx, dx), py = _mm256_add_pd(cy, dy);  // integers + 0.5: exact
    const __m256d e0 = _mm256_sub_pd(_mm256_mul_pd(sx0, _mm256_sub_pd(py, ay0)), _mm256_mul_pd(sy0, _mm256_sub_pd(px, ax0)));
    const __m256d e1 = _mm256_sub_pd(_mm256_mul_pd(sx1, _mm256_sub_pd(py, ay1)), _mm256_mul_pd(sy1, _mm256_sub_pd(px, ax1)));
    const __m256d e2 = _mm256_sub_pd(_mm256_mul_pd(sx2, _mm256_sub_pd(py, ay2)), _mm256_mul_pd(sy2, _mm256_sub_pd(px, ax2)));
    const __m256d in = _mm256_and_pd(_mm256_and_pd(edge_in4<(OWN & 1u) != 0>(e0, zero), edge_in4<(OWN & 2u) != 0>(e1, zero)),
                                     edge_in4<(OWN & 4u) != 0>(e2, zero));
    int bits = _mm256_movemask_pd(in);
    if (m - k < 4) bits &= (1 << (m - k)) - 1;  // lanes past the box
    const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(kTiny.perm[bits]));
    const __m256d pix = _mm256_add_pd(base, _mm256_add_pd(_mm256_mul_pd(dy, stride), dx));
    _mm256_storeu_pd(fq.e0 + n, _mm256_castps_pd(_mm256_permutevar8x32_ps(_mm256_castpd_ps(e0), idx)));
    _mm256_storeu_pd(fq.e1 + n, _mm256_castps_pd(_mm256_permutevar8x32_ps(_mm256_castpd_ps(e1), idx)));
    _mm256_storeu_pd(fq.e2 + n, _mm256_castps_pd(_mm256_permutevar8x32_ps(_mm256_castpd_ps(e2), idx)));
    _mm256_storeu_pd(fq.pix + n, _mm256_castps_pd(_mm256_permutevar8x32_ps(_mm256_castpd_ps(pix), idx)));
    _mm256_storeu_pd(fq.iz0 + n, iz0);
    _mm256_storeu_pd(fq.iz1 + n, iz1);
    _mm256_storeu_pd(fq.iz2 + n, iz2);
    _mm256_storeu_pd(fq.face + n, fid);
    n += _mm_popcnt_u32(static_cast<unsigned>(bits));
  }
  fq.n = n;
}

using TinyFn = void (*)(const Tri&, int32_t, int64_t, int64_t, int64_t, Block&, FragQueue&);
constexpr TinyFn kTinyAvx2[8] = {raster_tiny_avx2<0>, raster_tiny_avx2<1>, raster_tiny_avx2<2>, raster_tiny_avx2<3>,
                                 raster_tiny_avx2<4>, raster_tiny_avx2<5>, raster_tiny_avx2<6>, raster_tiny_avx2<7>};
#endif

using RasterFn = void (*)(const Tri&, int32_t, int64_t, int64_t, int64_t, Block&, __m128d*, FragQueue&, bool);
// [owner bits][box steps: 1..3 exactly, 0 any]
#define MVP_ROW(o) {raster_rows_sse2<o, 0>, raster_rows_sse2<o, 1>, raster_rows_sse2<o, 2>, raster_rows_sse2<o, 3>}
constexpr RasterFn kRasterSse2[8][4] = {MVP_ROW(0), MVP_ROW(1), MVP_ROW(2), MVP_ROW(3),
                                        MVP_ROW(4), MVP_ROW(5), MVP_ROW(6), MVP_ROW(7)};
#undef MVP_ROW
#endif

#if MVP_HAVE_AVX
// Stores of four outputs of one pixel group: float32 (the renderer's case) fully in vectors,
// other dtypes lane by lane.
MVP_AVX inline void store4(float* o_bary, float* o_depth, __m256d b0, __m256d b1, __m256d b2, __m256d d) {
  const __m128 f0 = _mm256_cvtpd_ps(b0), f1 = _mm256_cvtpd_ps(b1), f2 = _mm256_cvtpd_ps(b2);
  _mm_storeu_ps(o_depth, _mm256_cvtpd_ps(d));
  // interleave (a, b, c) = (b0, b1, b2) of pixels 0..3 into 12 floats
  const __m128 t01 = _mm_unpacklo_ps(f0, f1);                          // a0 b0 a1 b1
  const __m128 t23 = _mm_unpackhi_ps(f0, f1);                          // a2 b2 a3 b3
  const __m128 x0 = _mm_shuffle_ps(t01, f2, _MM_SHUFFLE(0, 0, 1, 0));  // a0 b0 c0 c0
  const __m128 x1 = _mm_shuffle_ps(t01, f2, _MM_SHUFFLE(1, 1, 3, 2));  // a1 b1 c1 c1
  const __m128 x2 = _mm_shuffle_ps(t23, f2, _MM_SHUFFLE(2, 2, 1, 0));  // a2 b2 c2 c2
  const __m128 x3 = _mm_shuffle_ps(t23, f2, _MM_SHUFFLE(3, 3, 3, 2));  // a3 b3 c3 c3
  const __m128 r0 = _mm_blend_ps(x0, _mm_shuffle_ps(x1, x1, 0), 0x8);                  // a0 b0 c0 a1
  const __m128 r1 = _mm_shuffle_ps(x1, x2, _MM_SHUFFLE(1, 0, 2, 1));                     // b1 c1 a2 b2
  const __m128 r2 = _mm_blend_ps(_mm_shuffle_ps(x3, x3, _MM_SHUFFLE(2, 1, 0, 0)),
                                 _mm_shuffle_ps(x2, x2, _MM_SHUFFLE(2, 2, 2, 2)), 0x1);  // c2 a3 b3 c3
  _mm_storeu_ps(o_bary, r0);
  _mm_storeu_ps(o_bary + 4, r1);
  _mm_storeu_ps(o_bary + 8, r2);
}
MVP_AVX inline void store4(double* o_bary, double* o_depth, __m256d b0, __m256d b1, __m256d b2, __m256d d) {
  alignas(32) double x0[4], x1[4], x2[4];
  _mm256_store_pd(x0, b0);
  _mm256_store_pd(x1, b1);
  _mm256_store_pd(x2, b2);
  _mm256_storeu_pd(o_depth, d);
  for (int l = 0; l < 4; ++l) {
    o_bary[3 * l] = x0[l];
    o_bary[3 * l + 1] = x1[l];
    o_bary[3 * l + 2] = x2[l];
  }
}

// One row of the outputs from a block z-buffer row, four pixels per step: bary_i = q_i / qs,
// depth = 1 / qs, zeros where empty. Returns the first column it did not write.
template <typename T>
MVP_AVX int64_t write_row_avx(const double* zid, const double* z0, const double* z1, const double* z2,
                              const double* zs, int64_t width, int64_t* o_id, T* o_bary, T* o_depth,
                              uint8_t* o_mask) {
  const __m256d zero = _mm256_setzero_pd(), one = _mm256_set1_pd(1.0);
  int64_t c = 0;
  for (; c + 4 <= width; c += 4) {
    const __m256d id = _mm256_loadu_pd(zid + c);
    const __m256d cov = _mm256_cmp_pd(id, zero, _CMP_GE_OQ);
    const int bits = _mm256_movemask_pd(cov);
    // tri_id: doubles holding integers in [-1, 2^31) -> int32 -> int64
    const __m128i i32 = _mm256_cvttpd_epi32(id);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o_id + c), _mm_cvtepi32_epi64(i32));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o_id + c + 2), _mm_cvtepi32_epi64(_mm_unpackhi_epi64(i32, i32)));
    const uint32_t mbytes = (bits & 1) | ((bits & 2) << 7) | ((bits & 4) << 14) | ((bits & 8) << 21);
    std::memcpy(o_mask + c, &mbytes, 4);
    if (!bits) {
      store4(o_bary + 3 * c, o_depth + c, zero, zero, zero, zero);
      continue;
    }
    const __m256d qs = _mm256_loadu_pd(zs + c);
    store4(o_bary + 3 * c, o_depth + c, _mm256_and_pd(cov, _mm256_div_pd(_mm256_loadu_pd(z0 + c), qs)),
           _mm256_and_pd(cov, _mm256_div_pd(_mm256_loadu_pd(z1 + c), qs)),
           _mm256_and_pd(cov, _mm256_div_pd(_mm256_loadu_pd(z2 + c), qs)), _mm256_and_pd(cov, _mm256_div_pd(one, qs)));
  }
  return c;
}
#endif

bool cpu_has_avx2() {
#if MVP_HAVE_AVX
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
  return has;
#else
  return false;
#endif
}

bool cpu_has_avx() {
#if MVP_HAVE_AVX
  static const bool has = __builtin_cpu_supports("avx");
  return has;
#else
  return false;
#endif
}

// ------------------------------------------------------------------------------ argument checks
std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

void check_array(const py::array& a, const char* name, std::initializer_list<int64_t> shape, bool writeable) {
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  int d = 0;
  for (int64_t s : shape) {
    if (!ok) break;
    ok = a.shape(d++) == s;
  }
  if (!ok) {
    std::string want = "(";
    d = 0;
    for (int64_t s : shape) want += (d++ ? ", " : "") + std::to_string(s);
    throw std::invalid_argument(std::string(name) + " must have shape " + want + "), got " + shape_str(a));
  }
  if (!(a.flags() & py::array::c_style))
    throw std::invalid_argument(std::string(name) + " must be C-contiguous");
  if (writeable && !a.writeable()) throw std::invalid_argument(std::string(name) + " must be writeable");
}

// Every face index in [0, nv); the message of the Python entry point's check otherwise.
void check_face_range(const int64_t* fp, int64_t nf, int64_t nv) {
  if (!nf) return;
  int64_t lo = fp[0], hi = fp[0];
  for (int64_t i = 1; i < 3 * nf; ++i) {
    lo = std::min(lo, fp[i]);
    hi = std::max(hi, fp[i]);
  }
  if (lo < 0 || hi >= nv)
    throw std::invalid_argument("faces index vertices in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                                "], but there are " + std::to_string(nv) + " vertices (valid: 0.." +
                                std::to_string(nv - 1) + ")");
}

template <typename T>
bool is_dtype(const py::array& a) { return a.dtype().is(py::dtype::of<T>()); }

void check_dtype_float(const py::array& a, const char* name) {
  if (!is_dtype<float>(a) && !is_dtype<double>(a))
    throw std::invalid_argument(std::string(name) + " must be float32 or float64");
}

template <typename T>
void check_dtype(const py::array& a, const char* name, const char* want) {
  if (!is_dtype<T>(a)) throw std::invalid_argument(std::string(name) + " must be " + want);
}

// ---------------------------------------------------------------------------------- rasterizer
template <typename T>
void rasterize_impl(const T* verts, int64_t n, int64_t nv, const int64_t* faces, int64_t nf, int64_t height,
                    int64_t width, bool cull, double near, int64_t* tri_id, T* bary, T* depth, uint8_t* mask,
                    int nthreads, int64_t block_rows, bool simd, bool avx) {
  const int64_t hw = height * width;
  avx = avx && simd && cpu_has_avx();
  const bool avx2 = avx && cpu_has_avx2();
  (void)avx2;  // unused without the AVX paths
  const int64_t bh = block_rows;
  const int64_t nblocks = (height + bh - 1) / bh;

  // 0. per-vertex float64 data
  // Scratch buffers of the calling thread, kept between calls: fresh multi-MB allocations would
  // page-fault on first touch every call.
  thread_local std::vector<Vtx> vtx;
  thread_local std::vector<Tri> tris;
  thread_local std::vector<int32_t> rows;
  const size_t ntri = static_cast<size_t>(n * nf);
  if (vtx.size() < static_cast<size_t>(n * nv)) vtx.resize(static_cast<size_t>(n * nv));
  if (tris.size() < ntri) tris.resize(ntri);
  if (rows.size() < 2 * ntri) rows.resize(2 * ntri);
  // (thread_local: the worker threads below must use these pointers, not the names)
  Vtx* const vtx_p = vtx.data();
  Tri* const tris_p = tris.data();
  int32_t* const rows_p = rows.data();
  std::atomic<bool> non_finite{false};
  parallel_for(n, nthreads, [&](int64_t img) {
    const T* vp = verts + img * nv * 3;
    Vtx* out = vtx_p + img * nv;
    bool finite = true;
    for (int64_t i = 0; i < nv; ++i) {
      const double u = static_cast<double>(vp[3 * i]), v = static_cast<double>(vp[3 * i + 1]),
                   z = static_cast<double>(vp[3 * i + 2]);
      finite &= std::isfinite(u) & std::isfinite(v) & std::isfinite(z);
      out[i] = Vtx{u, v, z, 1.0 / z};
    }
    if (!finite) non_finite.store(true);
  });
  if (non_finite.load()) throw std::invalid_argument("verts_pix contains NaN or infinite values");
  // 1. setup: tasks (view, face chunk). rows[2 f] = first bbox row, -1 when the face is dropped.
  const int64_t per_view = std::max<int64_t>(1, (2 * nthreads + n - 1) / std::max<int64_t>(1, n));
  const int64_t chunk = std::max<int64_t>(256, (nf + per_view - 1) / per_view);
  const int64_t nchunks = nf ? (nf + chunk - 1) / chunk : 0;
  parallel_for(n * nchunks, nthreads, [&](int64_t task) {
    const int64_t img = task / nchunks, f0 = (task % nchunks) * chunk, f1 = std::min(nf, f0 + chunk);
    const Vtx* vx = vtx_p + img * nv;
    Tri* tp = tris_p + img * nf;
    int32_t* rp = rows_p + 2 * img * nf;
    for (int64_t f = f0; f < f1; ++f) {
      if (setup_tri(vx, faces + 3 * f, height, width, cull, near, tp[f])) {
        rp[2 * f] = tp[f].r0;
        rp[2 * f + 1] = tp[f].r1;
      } else {
        rp[2 * f] = -1;
      }
    }
  });

  // 2. binning: per view, kept face ids per row block (ascending face id within a block)
  std::vector<std::vector<int64_t>> offsets(n);  // (nblocks + 1) per view
  std::vector<std::vector<int32_t>> bins(n);
  std::vector<int32_t> block_of_row(static_cast<size_t>(height));  // row / bh without a division per face
  for (int64_t r = 0; r < height; ++r) block_of_row[r] = static_cast<int32_t>(r / bh);
  const int32_t* bor = block_of_row.data();
  parallel_for(nf ? n : 0, nthreads, [&](int64_t img) {
    const int32_t* rp = rows_p + 2 * img * nf;
    std::vector<int64_t>& off = offsets[img];
    off.assign(nblocks + 1, 0);
    for (int64_t f = 0; f < nf; ++f) {
      if (rp[2 * f] < 0) continue;
      for (int64_t b = bor[rp[2 * f]], b1 = bor[rp[2 * f + 1]]; b <= b1; ++b) ++off[b + 1];
    }
    for (int64_t b = 0; b < nblocks; ++b) off[b + 1] += off[b];
    std::vector<int64_t> fill(off.begin(), off.end() - 1);
    std::vector<int32_t>& bin = bins[img];
    bin.resize(static_cast<size_t>(off[nblocks]));
    for (int64_t f = 0; f < nf; ++f) {
      if (rp[2 * f] < 0) continue;
      for (int64_t b = bor[rp[2 * f]], b1 = bor[rp[2 * f + 1]]; b <= b1; ++b) bin[fill[b]++] = static_cast<int32_t>(f);
    }
  });

  // 3. raster: tasks (view, row block), each with its own z-buffer (struct Block) in scratch
  // memory of the thread, kept between calls; triangles in ascending face id.
  const int64_t stride = ((width + 1) & ~int64_t(1)) + 2;  // even, two spare columns
  parallel_for(n * nblocks, nthreads, [&](int64_t task) {
    const int64_t img = task / nblocks, blk = task % nblocks;
    const int64_t row0 = blk * bh, row1 = std::min(height, row0 + bh);  // rows [row0, row1)
    const int64_t nrows = row1 - row0, plane = nrows * stride;
    thread_local std::vector<double> zbuf;
    if (zbuf.size() < static_cast<size_t>(5 * plane + 3 * stride + 8)) zbuf.resize(5 * plane + 3 * stride + 8);
    double* zp = zbuf.data();
    Block zb{zp, zp + plane, zp + 2 * plane, zp + 3 * plane, zp + 4 * plane, stride};
    std::fill(zb.id, zb.id + plane, -1.0);
    std::fill(zb.qs, zb.qs + plane, -1.0);
    if (nf) {
      const Tri* tp = tris_p + img * nf;
      const int32_t* bin = bins[img].data();
#if MVP_HAVE_SSE2
      // column terms of one triangle: 3 per two-pixel step, 16-byte aligned after the planes
      __m128d* ct = reinterpret_cast<__m128d*>((reinterpret_cast<uintptr_t>(zp + 5 * plane) + 15) & ~uintptr_t(15));
      thread_local FragQueue fq;
      fq.n = 0;
#endif
      for (int64_t k = offsets[img][blk], kend = offsets[img][blk + 1]; k < kend; ++k) {
        const int32_t f = bin[k];
        const Tri& t = tp[f];
        const int64_t ra = std::max<int64_t>(t.r0, row0), rb = std::min<int64_t>(t.r1, row1 - 1);
#if MVP_HAVE_SSE2
        if (simd) {
#if MVP_HAVE_AVX
          if (avx2 && t.c1 - t.c0 < kTinyW && (t.c1 - t.c0 + 1) * (rb - ra + 1) <= kTinyN) {
            if (fq.n > FragQueue::kCap - kTinyN) flush(fq, zb, avx);
            kTinyAvx2[t.owner](t, f, ra, rb, row0, zb, fq);
            continue;
          }
#endif
          const int64_t steps = (t.c1 - t.c0 + 2) >> 1;
          kRasterSse2[t.owner][steps <= 3 ? steps : 0](t, f, ra, rb, row0, zb, ct, fq, avx);
          continue;
        }
#endif
        raster_rows_scalar(t, static_cast<double>(f), ra, rb, row0, zb);
      }
#if MVP_HAVE_SSE2
      if (fq.n) flush(fq, zb, avx);
#endif
    }
    // the block's rows of every output (empty pixels too: -1 / 0 / false)
    for (int64_t r = 0; r < nrows; ++r) {
      const int64_t base = img * hw + (row0 + r) * width;
      int64_t* o_id = tri_id + base;
      T* o_bary = bary + 3 * base;
      T* o_depth = depth + base;
      uint8_t* o_mask = mask + base;
      const double *zid = zb.id + r * stride, *z0 = zb.q0 + r * stride, *z1 = zb.q1 + r * stride,
                   *z2 = zb.q2 + r * stride, *zs = zb.qs + r * stride;
      int64_t c = 0;
#if MVP_HAVE_AVX
      if (avx) c = write_row_avx(zid, z0, z1, z2, zs, width, o_id, o_bary, o_depth, o_mask);
#endif
#if MVP_HAVE_SSE2
      const __m128d zero = _mm_setzero_pd(), one = _mm_set1_pd(1.0);
      for (; c + 2 <= width; c += 2) {
        const __m128d id = _mm_loadu_pd(zid + c);
        const __m128d cov = _mm_cmpge_pd(id, zero);
        const int bits = _mm_movemask_pd(cov);
        if (!bits) {
          o_id[c] = o_id[c + 1] = -1;
          o_mask[c] = o_mask[c + 1] = 0;
          o_depth[c] = o_depth[c + 1] = T(0);
          std::fill(o_bary + 3 * c, o_bary + 3 * c + 6, T(0));
          continue;
        }
        // bary_i = q_i / qs, depth = 1 / qs; zero where empty
        const __m128d qs = _mm_loadu_pd(zs + c);
        alignas(16) double b0[2], b1[2], b2[2], d[2];
        _mm_store_pd(b0, _mm_and_pd(cov, _mm_div_pd(_mm_loadu_pd(z0 + c), qs)));
        _mm_store_pd(b1, _mm_and_pd(cov, _mm_div_pd(_mm_loadu_pd(z1 + c), qs)));
        _mm_store_pd(b2, _mm_and_pd(cov, _mm_div_pd(_mm_loadu_pd(z2 + c), qs)));
        _mm_store_pd(d, _mm_and_pd(cov, _mm_div_pd(one, qs)));
        for (int l = 0; l < 2; ++l) {
          o_id[c + l] = static_cast<int64_t>(zid[c + l]);
          o_mask[c + l] = static_cast<uint8_t>((bits >> l) & 1);
          o_depth[c + l] = static_cast<T>(d[l]);
          o_bary[3 * (c + l)] = static_cast<T>(b0[l]);
          o_bary[3 * (c + l) + 1] = static_cast<T>(b1[l]);
          o_bary[3 * (c + l) + 2] = static_cast<T>(b2[l]);
        }
      }
#endif
      for (; c < width; ++c) {
        if (zid[c] >= 0.0) {
          o_id[c] = static_cast<int64_t>(zid[c]);
          o_mask[c] = 1;
          o_depth[c] = static_cast<T>(1.0 / zs[c]);
          o_bary[3 * c] = static_cast<T>(z0[c] / zs[c]);
          o_bary[3 * c + 1] = static_cast<T>(z1[c] / zs[c]);
          o_bary[3 * c + 2] = static_cast<T>(z2[c] / zs[c]);
        } else {
          o_id[c] = -1;
          o_mask[c] = 0;
          o_depth[c] = T(0);
          o_bary[3 * c] = o_bary[3 * c + 1] = o_bary[3 * c + 2] = T(0);
        }
      }
    }
  });
}

void rasterize(py::array verts, py::array faces, int64_t height, int64_t width, bool cull_backfaces, double near,
               py::array tri_id, py::array bary, py::array depth, py::array mask, int num_threads,
               int64_t block_rows, bool simd, bool avx) {
  if (height <= 0 || width <= 0) throw std::invalid_argument("height and width must be positive");
  if (height > std::numeric_limits<int32_t>::max() || width > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("height and width must fit in int32");
  if (!(near > 0.0) || !std::isfinite(near)) throw std::invalid_argument("near must be a positive finite number");
  if (verts.ndim() != 3 || verts.shape(2) != 3)
    throw std::invalid_argument("verts must have shape (N, Nv, 3), got " + shape_str(verts));
  check_dtype_float(verts, "verts");
  const int64_t n = verts.shape(0), nv = verts.shape(1);
  check_array(verts, "verts", {n, nv, 3}, false);
  if (faces.ndim() != 2 || faces.shape(1) != 3)
    throw std::invalid_argument("faces must have shape (F, 3), got " + shape_str(faces));
  check_dtype<int64_t>(faces, "faces", "int64");
  const int64_t nf = faces.shape(0);
  check_array(faces, "faces", {nf, 3}, false);
  if (nf > std::numeric_limits<int32_t>::max()) throw std::invalid_argument("too many faces (max 2^31 - 1)");
  check_array(tri_id, "tri_id", {n, height, width}, true);
  check_dtype<int64_t>(tri_id, "tri_id", "int64");
  check_array(bary, "bary", {n, height, width, 3}, true);
  check_array(depth, "depth", {n, height, width}, true);
  check_array(mask, "mask", {n, height, width}, true);
  if (mask.dtype().kind() != 'b' || mask.itemsize() != 1) throw std::invalid_argument("mask must be bool");
  const bool f64 = is_dtype<double>(verts);
  if (!bary.dtype().is(verts.dtype()) || !depth.dtype().is(verts.dtype()))
    throw std::invalid_argument("bary and depth must have the dtype of verts");
  const int64_t* fp = static_cast<const int64_t*>(faces.data());
  check_face_range(fp, nf, nv);
  if (block_rows <= 0) block_rows = 32;
  block_rows = std::min(block_rows, height);
  const int nthreads = resolve_threads(num_threads);
  const void* vp = verts.data();
  int64_t* ip = static_cast<int64_t*>(tri_id.mutable_data());
  void* bp = bary.mutable_data();
  void* dp = depth.mutable_data();
  uint8_t* mp = static_cast<uint8_t*>(mask.mutable_data());
  py::gil_scoped_release release;
  if (f64)
    rasterize_impl<double>(static_cast<const double*>(vp), n, nv, fp, nf, height, width, cull_backfaces, near, ip,
                           static_cast<double*>(bp), static_cast<double*>(dp), mp, nthreads, block_rows, simd, avx);
  else
    rasterize_impl<float>(static_cast<const float*>(vp), n, nv, fp, nf, height, width, cull_backfaces, near, ip,
                          static_cast<float*>(bp), static_cast<float*>(dp), mp, nthreads, block_rows, simd, avx);
}

// ------------------------------------------------------------------------------- interpolation
// out[p] = sum_i bary[p, i] * attrs[img, faces[tri_id[p], i]] (bary cast to the attrs dtype first),
// 0 where mask is false. Mirrors interpolate_ref.
template <typename A, typename B>
void interpolate_impl(const A* attrs, int64_t n, int64_t nv, int64_t c, const int64_t* faces, int64_t nf,
                      const int64_t* tri_id, const B* bary, const uint8_t* mask, int64_t hw, A* out, int nthreads) {
  const int64_t total = n * hw;
  const int64_t chunk = 4096;
  bool finite = true;
  for (int64_t i = 0; i < n * nv * c; ++i) finite &= static_cast<bool>(std::isfinite(attrs[i]));
  if (!finite) throw std::invalid_argument("attrs contains NaN or infinite values");
  std::atomic<int64_t> bad_face{-1};  // largest out-of-range face id of a covered pixel
  parallel_for((total + chunk - 1) / chunk, nthreads, [&](int64_t task) {
    const int64_t p0 = task * chunk, p1 = std::min(total, p0 + chunk);
    int64_t bad = -1;
    for (int64_t p = p0; p < p1; ++p) {
      A* o = out + p * c;
      const int64_t f = tri_id[p];
      if (!mask[p] || f < 0 || f >= nf) {
        if (mask[p]) bad = std::max(bad, f < 0 ? std::numeric_limits<int64_t>::max() : f);
        for (int64_t k = 0; k < c; ++k) o[k] = A(0);
        continue;
      }
      const int64_t img = p / hw;
      const int64_t* fv = faces + 3 * f;
      const A* a0 = attrs + (img * nv + fv[0]) * c;
      const A* a1 = attrs + (img * nv + fv[1]) * c;
      const A* a2 = attrs + (img * nv + fv[2]) * c;
      const A b0 = static_cast<A>(bary[3 * p]), b1 = static_cast<A>(bary[3 * p + 1]),
              b2 = static_cast<A>(bary[3 * p + 2]);
      for (int64_t k = 0; k < c; ++k) o[k] = b0 * a0[k] + b1 * a1[k] + b2 * a2[k];
    }
    for (int64_t cur = bad_face.load(); bad > cur && !bad_face.compare_exchange_weak(cur, bad);) {
    }
  });
  if (const int64_t f = bad_face.load(); f >= 0)
    throw std::invalid_argument(f == std::numeric_limits<int64_t>::max()
                                    ? std::string("fragments mark a pixel covered with a negative face id")
                                    : "fragments reference face " + std::to_string(f) + ", but faces has " +
                                          std::to_string(nf) + " rows");
}

void interpolate(py::array attrs, py::array faces, py::array tri_id, py::array bary, py::array mask, py::array out,
                 int num_threads) {
  if (attrs.ndim() != 3) throw std::invalid_argument("attrs must have shape (N, Nv, C), got " + shape_str(attrs));
  check_dtype_float(attrs, "attrs");
  const int64_t n = attrs.shape(0), nv = attrs.shape(1), c = attrs.shape(2);
  check_array(attrs, "attrs", {n, nv, c}, false);
  if (faces.ndim() != 2 || faces.shape(1) != 3)
    throw std::invalid_argument("faces must have shape (F, 3), got " + shape_str(faces));
  check_dtype<int64_t>(faces, "faces", "int64");
  const int64_t nf = faces.shape(0);
  check_array(faces, "faces", {nf, 3}, false);
  if (tri_id.ndim() != 3) throw std::invalid_argument("tri_id must have shape (N, H, W), got " + shape_str(tri_id));
  const int64_t h = tri_id.shape(1), w = tri_id.shape(2);
  check_array(tri_id, "tri_id", {n, h, w}, false);
  check_dtype<int64_t>(tri_id, "tri_id", "int64");
  check_array(bary, "bary", {n, h, w, 3}, false);
  check_dtype_float(bary, "bary");
  check_array(mask, "mask", {n, h, w}, false);
  if (mask.dtype().kind() != 'b' || mask.itemsize() != 1) throw std::invalid_argument("mask must be bool");
  check_array(out, "out", {n, h, w, c}, true);
  if (!out.dtype().is(attrs.dtype())) throw std::invalid_argument("out must have the dtype of attrs");
  const int64_t* fp = static_cast<const int64_t*>(faces.data());
  check_face_range(fp, nf, nv);
  const int nthreads = resolve_threads(num_threads);
  const void* ap = attrs.data();
  const void* bp = bary.data();
  const int64_t* ip = static_cast<const int64_t*>(tri_id.data());
  const uint8_t* mp = static_cast<const uint8_t*>(mask.data());
  void* op = out.mutable_data();
  const bool a64 = is_dtype<double>(attrs), b64 = is_dtype<double>(bary);
  py::gil_scoped_release release;
  if (a64 && b64)
    interpolate_impl(static_cast<const double*>(ap), n, nv, c, fp, nf, ip, static_cast<const double*>(bp), mp, h * w,
                     static_cast<double*>(op), nthreads);
  else if (a64)
    interpolate_impl(static_cast<const double*>(ap), n, nv, c, fp, nf, ip, static_cast<const float*>(bp), mp, h * w,
                     static_cast<double*>(op), nthreads);
  else if (b64)
    interpolate_impl(static_cast<const float*>(ap), n, nv, c, fp, nf, ip, static_cast<const double*>(bp), mp, h * w,
                     static_cast<float*>(op), nthreads);
  else
    interpolate_impl(static_cast<const float*>(ap), n, nv, c, fp, nf, ip, static_cast<const float*>(bp), mp, h * w,
                     static_cast<float*>(op), nthreads);
}

// ------------------------------------------------------------------------------- normal map
// Fused interpolate + renormalise + encode: n = sum_i bary_i * normals[face_i] (as interpolate),
// unit = n / max(|n|, 1e-12), rgb = unit * 0.5 + 0.5; both 0 where mask is false. |n| is
// accumulated in float64. Mirrors normal_map_ref.
template <typename A, typename B>
void normal_map_impl(const A* nrm, int64_t n, int64_t nv, const int64_t* faces, int64_t nf, const int64_t* tri_id,
                     const B* bary, const uint8_t* mask, int64_t hw, A* unit, A* rgb, int nthreads) {
  bool finite = true;
  for (int64_t i = 0; i < n * nv * 3; ++i) finite &= static_cast<bool>(std::isfinite(nrm[i]));
  if (!finite) throw std::invalid_argument("normals contain NaN or infinite values");
  const int64_t total = n * hw;
  const int64_t chunk = 4096;
  std::atomic<int64_t> bad_face{-1};
  parallel_for((total + chunk - 1) / chunk, nthreads, [&](int64_t task) {
    const int64_t p0 = task * chunk, p1 = std::min(total, p0 + chunk);
    int64_t bad = -1;
    for (int64_t p = p0; p < p1; ++p) {
      A* u = unit + 3 * p;
      A* o = rgb + 3 * p;
      const int64_t f = tri_id[p];
      if (!mask[p] || f < 0 || f >= nf) {
        if (mask[p]) bad = std::max(bad, f < 0 ? std::numeric_limits<int64_t>::max() : f);
        u[0] = u[1] = u[2] = o[0] = o[1] = o[2] = A(0);
        continue;
      }
      const int64_t img = p / hw;
      const int64_t* fv = faces + 3 * f;
      const A* a0 = nrm + (img * nv + fv[0]) * 3;
      const A* a1 = nrm + (img * nv + fv[1]) * 3;
      const A* a2 = nrm + (img * nv + fv[2]) * 3;
      const A b0 = static_cast<A>(bary[3 * p]), b1 = static_cast<A>(bary[3 * p + 1]),
              b2 = static_cast<A>(bary[3 * p + 2]);
      A v[3];
      double len2 = 0.0;
      for (int k = 0; k < 3; ++k) {
        v[k] = b0 * a0[k] + b1 * a1[k] + b2 * a2[k];
        len2 += static_cast<double>(v[k]) * static_cast<double>(v[k]);
      }
      const A len = std::max(static_cast<A>(std::sqrt(len2)), static_cast<A>(1e-12));
      for (int k = 0; k < 3; ++k) {
        u[k] = v[k] / len;
        o[k] = u[k] * A(0.5) + A(0.5);
      }
    }
    for (int64_t cur = bad_face.load(); bad > cur && !bad_face.compare_exchange_weak(cur, bad);) {
    }
  });
  if (const int64_t f = bad_face.load(); f >= 0)
    throw std::invalid_argument(f == std::numeric_limits<int64_t>::max()
                                    ? std::string("fragments mark a pixel covered with a negative face id")
                                    : "fragments reference face " + std::to_string(f) + ", but faces has " +
                                          std::to_string(nf) + " rows");
}

void normal_map(py::array normals, py::array faces, py::array tri_id, py::array bary, py::array mask,
                py::array unit, py::array rgb, int num_threads) {
  if (normals.ndim() != 3 || normals.shape(2) != 3)
    throw std::invalid_argument("normals must have shape (N, Nv, 3), got " + shape_str(normals));
  check_dtype_float(normals, "normals");
  const int64_t n = normals.shape(0), nv = normals.shape(1);
  check_array(normals, "normals", {n, nv, 3}, false);
  if (faces.ndim() != 2 || faces.shape(1) != 3)
    throw std::invalid_argument("faces must have shape (F, 3), got " + shape_str(faces));
  check_dtype<int64_t>(faces, "faces", "int64");
  const int64_t nf = faces.shape(0);
  check_array(faces, "faces", {nf, 3}, false);
  if (tri_id.ndim() != 3) throw std::invalid_argument("tri_id must have shape (N, H, W), got " + shape_str(tri_id));
  const int64_t h = tri_id.shape(1), w = tri_id.shape(2);
  check_array(tri_id, "tri_id", {n, h, w}, false);
  check_dtype<int64_t>(tri_id, "tri_id", "int64");
  check_array(bary, "bary", {n, h, w, 3}, false);
  check_dtype_float(bary, "bary");
  check_array(mask, "mask", {n, h, w}, false);
  if (mask.dtype().kind() != 'b' || mask.itemsize() != 1) throw std::invalid_argument("mask must be bool");
  check_array(unit, "unit", {n, h, w, 3}, true);
  check_array(rgb, "rgb", {n, h, w, 3}, true);
  if (!unit.dtype().is(normals.dtype()) || !rgb.dtype().is(normals.dtype()))
    throw std::invalid_argument("unit and rgb must have the dtype of normals");
  const int64_t* fp = static_cast<const int64_t*>(faces.data());
  check_face_range(fp, nf, nv);
  const int nthreads = resolve_threads(num_threads);
  const void* ap = normals.data();
  const void* bp = bary.data();
  const int64_t* ip = static_cast<const int64_t*>(tri_id.data());
  const uint8_t* mp = static_cast<const uint8_t*>(mask.data());
  void* up = unit.mutable_data();
  void* op = rgb.mutable_data();
  const bool a64 = is_dtype<double>(normals), b64 = is_dtype<double>(bary);
  py::gil_scoped_release release;
  if (a64 && b64)
    normal_map_impl(static_cast<const double*>(ap), n, nv, fp, nf, ip, static_cast<const double*>(bp), mp, h * w,
                    static_cast<double*>(up), static_cast<double*>(op), nthreads);
  else if (a64)
    normal_map_impl(static_cast<const double*>(ap), n, nv, fp, nf, ip, static_cast<const float*>(bp), mp, h * w,
                    static_cast<double*>(up), static_cast<double*>(op), nthreads);
  else if (b64)
    normal_map_impl(static_cast<const float*>(ap), n, nv, fp, nf, ip, static_cast<const double*>(bp), mp, h * w,
                    static_cast<float*>(up), static_cast<float*>(op), nthreads);
  else
    normal_map_impl(static_cast<const float*>(ap), n, nv, fp, nf, ip, static_cast<const float*>(bp), mp, h * w,
                    static_cast<float*>(up), static_cast<float*>(op), nthreads);
}

}  // namespace

PYBIND11_MODULE(_rasterize_cpp, m) {
  m.doc() = "C++ CPU rasterizer and attribute interpolation for mvportrait (same results as rasterize_ref)";
  m.def("rasterize", &rasterize, py::arg("verts").noconvert(), py::arg("faces").noconvert(), py::arg("height"),
        py::arg("width"), py::arg("cull_backfaces"), py::arg("near"), py::arg("tri_id").noconvert(),
        py::arg("bary").noconvert(), py::arg("depth").noconvert(), py::arg("mask").noconvert(),
        py::arg("num_threads") = 0, py::arg("block_rows") = 0, py::arg("simd") = true, py::arg("avx") = true,
        "Rasterize verts (N, Nv, 3) [u, v, z] float32|float64 with faces (F, 3) int64 into the preallocated "
        "C-contiguous outputs tri_id (N, H, W) int64, bary (N, H, W, 3), depth (N, H, W) (dtype of verts) and "
        "mask (N, H, W) bool. num_threads <= 0: std::thread::hardware_concurrency(); block_rows <= 0: 32 rows "
        "per task; simd=False runs the scalar row loop (the same results; for tests). Releases the GIL.");
  m.attr("has_simd") = py::bool_(MVP_HAVE_SSE2 != 0);
  m.attr("has_avx") = py::bool_(cpu_has_avx());
  m.attr("has_avx2") = py::bool_(cpu_has_avx2());
  m.def("interpolate", &interpolate, py::arg("attrs").noconvert(), py::arg("faces").noconvert(),
        py::arg("tri_id").noconvert(), py::arg("bary").noconvert(), py::arg("mask").noconvert(),
        py::arg("out").noconvert(), py::arg("num_threads") = 0,
        "out (N, H, W, C) = perspective-correct interpolation of attrs (N, Nv, C) over the fragments; 0 where "
        "mask is false. Releases the GIL.");
  m.def("normal_map", &normal_map, py::arg("normals").noconvert(), py::arg("faces").noconvert(),
        py::arg("tri_id").noconvert(), py::arg("bary").noconvert(), py::arg("mask").noconvert(),
        py::arg("unit").noconvert(), py::arg("rgb").noconvert(), py::arg("num_threads") = 0,
        "Fused interpolate + renormalise + encode of per-vertex normals (N, Nv, 3): unit (N, H, W, 3) and "
        "rgb = unit * 0.5 + 0.5 (N, H, W, 3), 0 where mask is false. Releases the GIL.");
  m.def("hardware_threads", []() { return resolve_threads(0); }, "std::thread::hardware_concurrency() (>= 1)");
}
