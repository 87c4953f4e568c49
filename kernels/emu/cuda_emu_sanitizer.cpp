// cuda_emu_sanitizer.cpp -- the emulator's equivalent of compute-sanitizer's
// memcheck, racecheck and initcheck (synccheck is in the scheduler,
// cuda_emu_runtime.cpp). Every access through a checked pointer (cuda_emu.h:
// emu::ptr, emu::ref, emu::arr) calls access() below first; the first
// violation stops the launch with one message naming the thread, the block,
// the array, the element, the extent, the kind of access and the source line.
//
//   memcheck   the access lies inside its Region: the NumPy array passed as
//              that parameter (a view is bounded by the view), a __shared__
//              array (each index against its declared dimension), or the
//              launch's dynamic shared memory. Member access through p->x
//              checks the whole object.
//   initcheck  a read finds every byte it reads written: shadow bytes, one
//              per byte; shared memory starts unwritten in every block, an
//              array from EmuDevice.empty carries its shadow from launch to
//              launch (emulator.py owns it), any other array counts as written.
//   racecheck  for every element, the last write and the last reads by two
//              different threads, each with the block's clock when it
//              happened. An access conflicts with one by another thread (at
//              least one a write) unless a barrier both took part in lies
//              between them: a __syncthreads, or a warp operation (shuffle,
//              vote, __syncwarp) whose mask held both. Global memory: a read
//              of an element another thread of the launch wrote, or a second
//              write, is a race unless both threads are in one block and a
//              barrier orders them (blocks are never ordered); write-after-
//              read is not tracked there. Atomics are exempt (they still must
//              be in bounds and, as reads, initialised).
// The shadow state is not locked: a launch that tracks it runs on one OS thread.
#include <cstdlib>

#include "cuda_emu_internal.h"

namespace emu {

static bool tracking(unsigned checks) { return checks & (MEMCHECK | RACECHECK | INITCHECK); }

template <class T>
static T* zeroed(size_t n) {
    return static_cast<T*>(calloc(n ? n : 1, sizeof(T)));  // untouched pages cost nothing
}

// ---------------------------------------------------------------- regions
void make_arg_regions(const Launch& L, unsigned checks, std::vector<RegionState>& regions,
                      std::vector<Region*>& table) {
    regions.resize(L.nargs);
    table.assign(L.nargs, nullptr);
    if (!tracking(checks)) return;
    for (int i = 0; i < L.nargs; ++i) {
        const ArgInfo& a = L.info[i];
        if (!a.itemsize) continue;  // not a pointer
        if (a.same_as >= 0) {       // the same array as an earlier parameter: one shadow
            table[i] = table[a.same_as];
            continue;
        }
        RegionState& r = regions[i];
        r.name = a.name;
        r.type = a.type;
        r.base = *static_cast<char**>(L.args[i]);
        r.bytes = a.bytes;
        r.elem = a.itemsize;
        r.init = a.init;
        if (checks & RACECHECK) r.gcells.reset(zeroed<Access>(a.bytes / a.itemsize));
        r.shadowed = (r.init && (checks & INITCHECK)) || (checks & RACECHECK);
        table[i] = &r;
    }
}

void reset_shared_region(Worker* w, RegionState& r, void* base, size_t bytes, size_t elem,
                         const char* name, const char* type, int ndims, const long long* dims) {
    r.name = name;
    r.type = type;
    r.base = static_cast<char*>(base);
    r.bytes = bytes;
    r.elem = elem;
    r.shared = true;
    r.ndims = std::min(ndims, 8);
    for (int d = 0; d < r.ndims; ++d) r.dims[d] = dims[d];
    if (w->checks & INITCHECK) {
        r.init_store.assign(bytes, 0);  // nothing written in this block yet
        r.init = r.init_store.data();
    }
    if ((w->checks & RACECHECK) && !r.scells) r.scells.reset(zeroed<SharedCell>(bytes / elem));
    r.shadowed = w->checks & (INITCHECK | RACECHECK);
}

void start_block_shadow(Worker* w) {
    if (!tracking(w->checks)) return;
    RegionState& r = w->dynamic_region;
    r.base = reinterpret_cast<char*>(w->dynamic_shared.data());
    r.bytes = w->dynamic_shared.size();
    r.shared = r.dynamic = true;
    if (w->checks & INITCHECK) {
        r.init_store.assign(r.bytes, 0);
        r.init = r.init_store.data();
    }
    // one cell per byte: enough whatever element type the kernel declares
    if ((w->checks & RACECHECK) && !r.scells) r.scells.reset(zeroed<SharedCell>(r.bytes));
    r.shadowed = w->checks & (INITCHECK | RACECHECK);
}

// ---------------------------------------------------------------- messages
static const char* verb(int kind) {
    switch (kind) {
        case READ: return "reads";
        case WRITE: return "writes";
        case READ_WRITE: return "updates";
        case ATOMIC: return "atomically updates";
        default: return "accesses a member of";
    }
}

static std::string who(Worker* w) {
    return "thread " + thread_name(w->view, fiber()->view.linear) + " of block " +
           block_name(w->view, w->block_linear);
}

// "shared As (real[64][33])" or "y (float32, 120 elements)"
static std::string describe(const RegionState& r) {
    size_t n = r.bytes / r.elem;
    std::string count = std::to_string(n) + (n == 1 ? " element" : " elements");
    if (r.dynamic)
        return std::string("dynamic shared ") + r.name + " (" + r.type + ", " + count +
               " in the launch's " + std::to_string(r.bytes) + " bytes of shared_mem)";
    if (r.shared) {
        std::string t = r.type;
        for (int d = 0; d < r.ndims; ++d) t += "[" + std::to_string(r.dims[d]) + "]";
        return std::string("shared ") + r.name + " (" + t + ")";
    }
    return std::string(r.name) + " (" + r.type + ", " + count + ")";
}

// "As[3][5]" for element e of a multi-dimensional shared array, else "x[e]".
static std::string element_name(const RegionState& r, long long e) {
    std::string prefix = r.shared ? "shared " : "";
    if (!r.shared || r.ndims < 2 || e < 0 || (size_t)e >= r.bytes / r.elem)
        return prefix + r.name + "[" + std::to_string(e) + "]";
    std::string s;
    for (int d = r.ndims - 1; d >= 0; --d) {
        s = "[" + std::to_string(e % r.dims[d]) + "]" + s;
        e /= r.dims[d];
    }
    return prefix + r.name + s;
}

[[noreturn]] static void stop(Worker* w, const std::string& msg) {
    fail(w, msg);
    abandon(w);
}

static long long element_of(const RegionState& r, long long off) {
    long long e = (long long)r.elem;
    return off >= 0 ? off / e : -((-off + e - 1) / e);
}

void note_bad_index(Region* r, int rank, long long index, long long extent, int line) {
    Worker* w = worker();
    w->bad.region = static_cast<RegionState*>(r);
    w->bad.rank = rank;
    w->bad.index = index;
    w->bad.extent = extent;
    w->bad.line = line;
}

// Messages read "<check>: <thread> <reads|writes...> <element> at <file:line>: <why>".
[[noreturn]] static void report_bad_index(Worker* w, int kind, int line) {
    const RegionState& r = *w->bad.region;
    int dim = r.ndims - w->bad.rank;
    stop(w, "memcheck: " + who(w) + " " + verb(kind) + " shared " + r.name + " with index " +
                std::to_string(w->bad.index) + " in dimension " + std::to_string(dim) +
                at_line(w, w->bad.line ? w->bad.line : line) + ": outside [0, " +
                std::to_string(w->bad.extent) + ") of " + describe(r));
}

[[noreturn]] static void report_out_of_bounds(Worker* w, const RegionState& r, long long off,
                                              int kind, int line) {
    std::string bytes = off % (long long)r.elem ? " (byte offset " + std::to_string(off) + ")"
                                                : "";
    stop(w, "memcheck: " + who(w) + " " + verb(kind) + " " +
                element_name(r, element_of(r, off)) + bytes + at_line(w, line) +
                ": outside " + describe(r));
}

[[noreturn]] static void report_uninitialised(Worker* w, const RegionState& r, long long off,
                                              int kind, int line) {
    std::string what = "initcheck: " + who(w) + " " + verb(kind) + " " +
                       element_name(r, element_of(r, off)) + at_line(w, line);
    if (r.shared)
        stop(w, what + " before any thread of the block wrote it");
    stop(w, what + " before anything wrote it (" + describe(r) +
                ": it came from EmuDevice.empty and no kernel has written this element)");
}

// ------------------------------------------------------------------ races
// Did an access by thread `other` (linear in this block) stamped `stamp`
// happen before whatever thread `me` does now?
static bool ordered(Worker* w, int other, unsigned long long stamp, int me) {
    if (stamp < w->block_sync) return true;
    if (other >> 5 != me >> 5) return false;
    if (stamp < w->warp_full[me >> 5]) return true;
    return w->pair_used && stamp < w->pair_sync[size_t(me) * 32 + (other & 31)];
}

static const char* hazard(int now_kind, int then_kind) {
    if (now_kind == READ) return "read-after-write";
    return then_kind == READ ? "write-after-read" : "write-after-write";
}

[[noreturn]] static void report_race(Worker* w, const RegionState& r, long long e, int kind,
                                     const Access& then, int then_kind, int line) {
    const BlockView& v = w->view;
    std::string other, between;
    if (r.shared) {
        other = "thread " + thread_name(v, int(then.thread - 1));
        between = "with no __syncthreads between them";
    } else {
        long long b = (then.thread - 1) / v.nthreads;
        int t = int((then.thread - 1) % v.nthreads);
        other = "thread " + thread_name(v, t) + " of block " + block_name(v, b);
        between = b == w->block_linear ? "with no __syncthreads between them"
                                       : "in the same launch (blocks are not ordered)";
    }
    stop(w, "racecheck: " + who(w) + " " + (kind == READ ? "reads " : "writes ") +
                element_name(r, e) + at_line(w, line) + " after " + other +
                (then_kind == READ ? " read it" : " wrote it") + at_line(w, then.line) + ", " +
                between + " (" + hazard(kind, then_kind) + " hazard on " + describe(r) + ")");
}

static void track_shared(Worker* w, RegionState& r, size_t e, int kind, int line) {
    SharedCell& c = r.scells.get()[e];
    int me = fiber()->view.linear;
    long long id = me + 1;
    Access now{id, w->clock, line};
    auto conflicts = [&](const Access& a) {
        return a.thread && a.thread != id && !ordered(w, int(a.thread - 1), a.stamp, me);
    };
    if (kind & READ) {
        if (conflicts(c.w)) report_race(w, r, (long long)e, READ, c.w, WRITE, line);
        if (c.r1.thread != id) c.r2 = c.r1;
        c.r1 = now;
    }
    if (kind & WRITE) {
        if (conflicts(c.w)) report_race(w, r, (long long)e, WRITE, c.w, WRITE, line);
        if (conflicts(c.r1)) report_race(w, r, (long long)e, WRITE, c.r1, READ, line);
        if (conflicts(c.r2)) report_race(w, r, (long long)e, WRITE, c.r2, READ, line);
        c.w = now;
    }
}

static void track_global(Worker* w, RegionState& r, size_t e, int kind, int line) {
    Access& c = r.gcells.get()[e];
    int me = fiber()->view.linear, n = w->view.nthreads;
    long long id = w->block_linear * n + me + 1;
    bool conflict = c.thread && c.thread != id &&
                    ((c.thread - 1) / n != w->block_linear ||
                     !ordered(w, int((c.thread - 1) % n), c.stamp, me));
    if (conflict) report_race(w, r, (long long)e, kind & READ ? READ : WRITE, c, WRITE, line);
    if (kind & WRITE) c = Access{id, w->clock, line};
}

// ----------------------------------------------------------------- access
void access(Region* region, const void* addr, size_t n, int kind, int line, bool bad) {
    RegionState* r = static_cast<RegionState*>(region);
    Worker* w = worker();
    unsigned checks = w->checks;
    if (bad && (checks & MEMCHECK)) report_bad_index(w, kind, line);
    long long off = static_cast<const char*>(addr) - r->base;
    if (off < 0 || (unsigned long long)off + n > r->bytes) {
        if (checks & MEMCHECK) report_out_of_bounds(w, *r, off, kind, line);
        return;  // unchecked: the access goes ahead, as on the GPU
    }
    if (kind == MEMBER) return;
    if ((checks & INITCHECK) && r->init) {
        unsigned char* s = r->init + off;
        if (kind != WRITE)
            for (size_t i = 0; i < n; ++i)
                if (!s[i]) report_uninitialised(w, *r, off + (long long)i, kind, line);
        if (kind != READ) memset(s, 1, n);
    }
    if ((checks & RACECHECK) && kind != ATOMIC) {
        size_t e0 = size_t(off) / r->elem, e1 = (size_t(off) + n - 1) / r->elem;
        for (size_t e = e0; e <= e1; ++e) {
            if (r->shared)
                track_shared(w, *r, e, kind, line);
            else
                track_global(w, *r, e, kind, line);
        }
    }
}

}  // namespace emu
