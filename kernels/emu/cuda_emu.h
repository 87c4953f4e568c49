// cuda_emu.h -- what a CUDA C kernel sees when it runs in the CPU emulator.
//
// A .cu file is compiled as C++ with this header force-included
// (g++ -include cuda_emu.h) and linked with cuda_emu_runtime.cpp, which runs
// the launches. minitorch_gx/cuda/emulator.py drives both: it rewrites the
// kernel's pointer types into checked pointers (emu::ptr), its __shared__
// declarations into checked per-block arrays (emu::arr), appends one entry
// point per kernel, builds a .so and calls it with ctypes.
//
// This header provides: the built-in variables (threadIdx, blockIdx, blockDim,
// gridDim), __syncthreads, warp shuffles / votes / __syncwarp, atomics (on
// raw and on checked pointers), __ldg and the fast-math intrinsics the
// kernels use, CUDA's min/max, and the launch templates that call a kernel
// with arguments handed over from Python. The checked memory types of the
// sanitizer (ptr, ref, arr) are in cuda_emu_checked.h, the checks themselves
// in cuda_emu_sanitizer.cpp, the scheduler in cuda_emu_runtime.cpp.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>
#include <utility>

#define CUDA_EMU 1

// ---------------------------------------------------------------- CUDA types
struct uint3 { unsigned int x, y, z; };
struct dim3 {
    unsigned int x, y, z;
    dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define warpSize 32

// ------------------------------------------------- the runtime's interface
namespace emu {

// The parts of a fiber (one CUDA thread) and of a block that kernel code reads.
struct ThreadView {
    uint3 tid;
    int linear;          // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
    unsigned warp_ops;   // warp operations done so far: picks the exchange buffer
};
struct BlockView {
    uint3 block_idx;
    dim3 block, grid;
    int nthreads;
};
// (hidden: the runtime is linked into each kernel's .so, so these resolve
// inside it, which makes every threadIdx read a cheap thread-local access)
extern thread_local ThreadView* tl_thread __attribute__((visibility("hidden")));
extern thread_local BlockView* tl_block __attribute__((visibility("hidden")));

enum Wait { AT_BLOCK_BARRIER = 1, AT_WARP_BARRIER = 2 };
constexpr uint64_t POISON = ~0ull;  // 0xFF bytes: NaN as float or double

// The checks a launch can run (Options::checks is a set of these bits).
enum Check { MEMCHECK = 1, RACECHECK = 2, INITCHECK = 4, SYNCCHECK = 8 };
// What an access does to memory.
enum Kind { READ = 1, WRITE = 2, READ_WRITE = 3, ATOMIC = 4, MEMBER = 8 };

// One array a kernel can reach: a pointer argument or a shared array. Kernel
// code sees its extent, so that an access with no shadow state to update
// (memcheck alone) is checked inline; the runtime's RegionState
// (cuda_emu_internal.h) adds names and shadow memory.
struct Region {
    char* base = nullptr;
    size_t bytes = 0;
    bool shadowed = false;  // initcheck or racecheck follows it: every access calls access()
};

// Suspend this fiber until the scheduler releases its barrier. `mask`: the
// lanes of a warp operation; `line`: the source line of the call, which also
// tells one __syncthreads call from another (code addresses would not: the
// compiler may copy a call when it unrolls or peels a loop).
void park(int wait, unsigned mask, int line);
// This block's copy of __shared__ variable `id` (allocated, filled with 0xFF,
// by the first thread that asks); *region is its Region, or null when no
// memory check is on. dims: the declared dimensions (ndims of them).
void* shared_slot(int id, size_t bytes, size_t align, size_t elem, const char* name,
                  const char* type, int ndims, const long long* dims, Region** region);
void* dynamic_shared_memory(size_t elem, const char* name, const char* type, Region** region);
// The sanitizer: called before every access through a checked pointer; stops
// the launch with a message at the first violation. `bad`: an index was
// outside its declared dimension (note_bad_index said which).
void access(Region* r, const void* addr, size_t bytes, int kind, int line, bool bad);
void note_bad_index(Region* r, int rank, long long index, long long extent, int line);
// One of the two exchange buffers for warp operations (8 bytes per thread).
uint64_t* exchange_buffer(unsigned parity);
// Lanes of the warp starting at thread `base` that have not returned.
unsigned lanes_alive(int base);
// __trap(): abandon the launch with an error.
[[noreturn]] void trap();

}  // namespace emu

// ptr<T>, ref<T>, arr<T>: the checked memory of the sanitizer.
#include "cuda_emu_checked.h"

namespace emu {

// ------------------------------------------------------------- launches
// What Python tells the runtime about each kernel parameter (itemsize = 0:
// not a pointer) and about the launch. Mirrored by ctypes in emulator.py.
struct ArgInfo {
    unsigned long long bytes, itemsize;
    unsigned char* init;  // one byte per byte of the array: 1 = written; null: all written
    const char* name;     // the parameter's name
    const char* type;     // the array's dtype
    int same_as;          // an earlier parameter given the same array, or -1
    int pad;
};
struct Options {
    int workers;
    unsigned checks;
    int schedule;  // 0 index order, 1 reversed, 2 seeded random
    int pad;
    unsigned long long seed;
    const char* kernel;
    const char* file;
};

struct Launch {
    void* fn;
    void (*invoke)(void*, void**, Region* const*);
    void** args;
    int nargs;
    dim3 grid, block;
    size_t dynamic_shared;
    size_t stack_bytes;
    const ArgInfo* info;
    const Options* options;
    Region* const* regions = nullptr;  // one per parameter (null: not checked); set by the runtime
};
int run_launch(const Launch& launch, char* err, int errlen);

// A kernel parameter from the value Python stored behind args[i]: pointers
// become checked pointers into their Region.
template <class A>
struct param {
    static A get(void* a, Region*) { return *static_cast<A*>(a); }
};
template <class T>
struct param<ptr<T>> {
    static ptr<T> get(void* a, Region* r) { return ptr<T>(*static_cast<T**>(a), r); }
};
template <class... A, size_t... I>
void invoke_impl(void (*fn)(A...), void** args, Region* const* regions,
                 std::index_sequence<I...>) {
    fn(param<std::remove_cv_t<std::remove_reference_t<A>>>::get(args[I], regions[I])...);
}
template <class... A>
void invoke(void* fn, void** args, Region* const* regions) {
    invoke_impl(reinterpret_cast<void (*)(A...)>(fn), args, regions,
                std::index_sequence_for<A...>{});
}

template <class... A>
int launch(void (*fn)(A...), const unsigned* dims, unsigned long long dynamic_shared,
           unsigned long long stack_bytes, void** args, const ArgInfo* info,
           const Options* options, char* err, int errlen) {
    Launch L{reinterpret_cast<void*>(fn), &invoke<A...>, args, int(sizeof...(A)),
             dim3(dims[0], dims[1], dims[2]), dim3(dims[3], dims[4], dims[5]),
             size_t(dynamic_shared), size_t(stack_bytes), info, options};
    return run_launch(L, err, errlen);
}

// A kernel's parameter types as text, e.g. "pf,pf,i,f," for
// (float*, const float*, int, float): Python checks its arguments against it.
template <char C, bool P = false> struct coded {
    static constexpr char c = C;
    static constexpr bool ptr = P;
};
template <class T> struct code : coded<'?'> {};
template <> struct code<float> : coded<'f'> {};
template <> struct code<double> : coded<'d'> {};
template <> struct code<int> : coded<'i'> {};
template <> struct code<unsigned> : coded<'I'> {};
template <> struct code<long long> : coded<'q'> {};
template <> struct code<unsigned long long> : coded<'Q'> {};
template <> struct code<signed char> : coded<'b'> {};
template <> struct code<unsigned char> : coded<'B'> {};
template <> struct code<bool> : coded<'o'> {};
template <class T> struct code<T*> : coded<code<std::remove_cv_t<T>>::c, true> {};
template <class T> struct code<ptr<T>> : coded<code<std::remove_cv_t<T>>::c, true> {};
template <class... A>
const char* signature(void (*)(A...)) {
    static char text[3 * sizeof...(A) + 1];
    char* p = text;
    ((code<std::remove_cv_t<A>>::ptr ? (void)(*p++ = 'p') : (void)0,
      *p++ = code<std::remove_cv_t<A>>::c, *p++ = ','), ...);
    *p = 0;
    return text;
}

// Every lane of the warp publishes v; lane `src` of the warp (-1: keep your
// own) is read back. A source lane that does not exist or is not in the mask
// is undefined on the GPU: it reads as poison here. Two buffers alternate, so
// a lane that runs ahead to the next operation cannot overwrite a value
// another lane has yet to read.
template <class T>
T warp_exchange(unsigned mask, T v, int src, int line) {
    static_assert(sizeof(T) <= 8, "warp shuffles move at most 8 bytes");
    ThreadView* t = tl_thread;
    int me = t->linear, base = me & ~31;
    uint64_t* x = exchange_buffer(t->warp_ops++ & 1u);
    uint64_t bits = POISON;
    memcpy(&bits, &v, sizeof(T));
    x[me] = bits;
    park(AT_WARP_BARRIER, mask, line);
    T r = v;
    if (src >= 0) {
        bool ok = (mask >> src & 1u) && base + src < tl_block->nthreads;
        uint64_t got = ok ? x[base + src] : POISON;
        memcpy(&r, &got, sizeof(T));
    }
    return r;
}
inline int lane_id() { return tl_thread->linear & 31; }

}  // namespace emu

// ------------------------------------------------------- built-in variables
#define threadIdx (emu::tl_thread->tid)
#define blockIdx (emu::tl_block->block_idx)
#define blockDim (emu::tl_block->block)
#define gridDim (emu::tl_block->grid)

// The line of the call tells which __syncthreads a thread waits at, so that
// a barrier in divergent code is reported.
inline void __syncthreads(int line = __builtin_LINE()) {
    emu::park(emu::AT_BLOCK_BARRIER, 0, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, int line = __builtin_LINE()) {
    emu::tl_thread->warp_ops++;  // keeps every lane's exchange-buffer parity in step
    emu::park(emu::AT_WARP_BARRIER, mask, line);
}
inline void __trap() { emu::trap(); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ------------------------------------------------------------------- warps
template <class V, class T = emu::value_t<V>>
T __shfl_sync(unsigned mask, const V& value, int src_lane, int width = 32,
              int line = __builtin_LINE()) {
    int lane = emu::lane_id();
    return emu::warp_exchange<T>(mask, value, (lane & ~(width - 1)) + (src_lane & (width - 1)),
                                 line);
}
template <class V, class T = emu::value_t<V>>
T __shfl_down_sync(unsigned mask, const V& value, unsigned delta, int width = 32,
                   int line = __builtin_LINE()) {
    int lane = emu::lane_id();
    int src = (lane & (width - 1)) + int(delta) < width ? lane + int(delta) : -1;
    return emu::warp_exchange<T>(mask, value, src, line);
}
template <class V, class T = emu::value_t<V>>
T __shfl_up_sync(unsigned mask, const V& value, unsigned delta, int width = 32,
                 int line = __builtin_LINE()) {
    int lane = emu::lane_id();
    int src = (lane & (width - 1)) >= int(delta) ? lane - int(delta) : -1;
    return emu::warp_exchange<T>(mask, value, src, line);
}
template <class V, class T = emu::value_t<V>>
T __shfl_xor_sync(unsigned mask, const V& value, int lane_mask, int width = 32,
                  int line = __builtin_LINE()) {
    int lane = emu::lane_id();
    int src = lane ^ lane_mask;
    if (src >= (lane & ~(width - 1)) + width) src = -1;  // later width-groups: keep your own
    return emu::warp_exchange<T>(mask, value, src, line);
}
inline unsigned __ballot_sync(unsigned mask, int predicate, int line = __builtin_LINE()) {
    emu::ThreadView* t = emu::tl_thread;
    int me = t->linear, base = me & ~31;
    uint64_t* x = emu::exchange_buffer(t->warp_ops++ & 1u);
    x[me] = predicate != 0;
    emu::park(emu::AT_WARP_BARRIER, mask, line);
    unsigned bits = 0;
    for (int j = 0; j < 32 && base + j < emu::tl_block->nthreads; ++j)
        if ((mask >> j & 1u) && x[base + j] == 1) bits |= 1u << j;
    return bits;
}
inline int __any_sync(unsigned mask, int p, int line = __builtin_LINE()) {
    return __ballot_sync(mask, p, line) != 0;
}
inline int __all_sync(unsigned mask, int p, int line = __builtin_LINE()) {
    return __ballot_sync(mask, !p, line) == 0;
}
inline unsigned __activemask() { return emu::lanes_alive(emu::tl_thread->linear & ~31); }

// ----------------------------------------------------------------- atomics
// On raw pointers (locals) and, checked (in bounds, initialised; exempt from
// the race tracker), on checked ones.
template <class T>
T emu_atomic_add_float(T* addr, T v) {
    using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
    Bits* p = reinterpret_cast<Bits*>(addr);
    Bits old_bits = __atomic_load_n(p, __ATOMIC_RELAXED), new_bits;
    T old_val, new_val;
    do {
        memcpy(&old_val, &old_bits, sizeof(T));
        new_val = old_val + v;
        memcpy(&new_bits, &new_val, sizeof(T));
    } while (!__atomic_compare_exchange_n(p, &old_bits, new_bits, true, __ATOMIC_RELAXED,
                                          __ATOMIC_RELAXED));
    return old_val;
}
template <class T, class F>
T emu_atomic_update(T* a, F f) {
    T old = __atomic_load_n(a, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(a, &old, f(old), true, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED)) {
    }
    return old;
}
inline float atomicAdd(float* a, float v) { return emu_atomic_add_float(a, v); }
inline double atomicAdd(double* a, double v) { return emu_atomic_add_float(a, v); }
inline int atomicAdd(int* a, int v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }
inline unsigned atomicAdd(unsigned* a, unsigned v) {
    return __atomic_fetch_add(a, v, __ATOMIC_RELAXED);
}
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
    return __atomic_fetch_add(a, v, __ATOMIC_RELAXED);
}
inline int atomicMax(int* a, int v) {
    return emu_atomic_update(a, [v](int o) { return o > v ? o : v; });
}
inline int atomicMin(int* a, int v) {
    return emu_atomic_update(a, [v](int o) { return o < v ? o : v; });
}
inline unsigned atomicMax(unsigned* a, unsigned v) {
    return emu_atomic_update(a, [v](unsigned o) { return o > v ? o : v; });
}
inline int atomicExch(int* a, int v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }
inline unsigned atomicExch(unsigned* a, unsigned v) {
    return __atomic_exchange_n(a, v, __ATOMIC_RELAXED);
}
template <class T>
T atomicCAS(T* a, T compare, T v) {
    __atomic_compare_exchange_n(a, &compare, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return compare;  // the old value, as on the GPU
}
#define EMU_CHECKED_ATOMIC(name)                                                        \
    template <class T>                                                                  \
    T name(emu::ptr<T> a, typename emu::same<T>::type v, int line = __builtin_LINE()) { \
        if (a.r) emu::access(a.r, a.p, sizeof(T), emu::ATOMIC, line, false);            \
        return name(a.p, v);                                                            \
    }
EMU_CHECKED_ATOMIC(atomicAdd)
EMU_CHECKED_ATOMIC(atomicMax)
EMU_CHECKED_ATOMIC(atomicMin)
EMU_CHECKED_ATOMIC(atomicExch)
#undef EMU_CHECKED_ATOMIC
template <class T>
T atomicCAS(emu::ptr<T> a, typename emu::same<T>::type compare, typename emu::same<T>::type v,
            int line = __builtin_LINE()) {
    if (a.r) emu::access(a.r, a.p, sizeof(T), emu::ATOMIC, line, false);
    return atomicCAS(a.p, compare, v);
}

// ------------------------------------------------------------- intrinsics
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T>
std::remove_cv_t<T> __ldg(emu::ptr<T> p, int line = __builtin_LINE()) {
    if (p.r) emu::access(p.r, p.p, sizeof(T), emu::READ, line, false);
    return *p.p;
}
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned i) { float f; memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; memcpy(&i, &f, 4); return i; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }

// CUDA's device min/max overloads.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
