// cuda_emu_checked.h -- the checked memory types of the emulator's
// sanitizer, included by cuda_emu.h. emulator.py rewrites a kernel's pointer
// types into ptr<T> and its __shared__ arrays into arr<T>; every element
// access goes through a ref<T>, which asks the runtime (emu::access, in
// cuda_emu_sanitizer.cpp) whether it is in bounds, initialised and race-free:
//   ptr<T>  a pointer that knows the Region (a kernel argument, a shared
//           array) it points into; p[i], *p, p + n, p - q, comparisons work
//           as a raw pointer's;
//   ref<T>  what p[i] returns: reading it (conversion to T) or writing it
//           (=, +=, ++ ...) checks first; &p[i] is a ptr<T> again;
//   arr<T>  a view of a __shared__ array such as float[8][33]: each index is
//           checked against its declared dimension;
//   val(e)  e, or the value a ref reads (wrapped around ?: operands and auto
//           initializers by emulator.py, so that a ref never changes a type).
// A pointer made from a local's address (&x) has no Region and is not
// checked; with every check off the Regions are null and an access costs one
// test. Source lines come from __builtin_LINE() default arguments: an index
// is converted to emu::Index at the call site, which records the line.
#pragma once

namespace emu {

// An array index with the source line of the expression that wrote it.
struct Index {
    long long v;
    int line;
    template <class I, std::enable_if_t<std::is_convertible_v<I, long long>, int> = 0>
    Index(const I& i, int line_ = __builtin_LINE()) : v((long long)i), line(line_) {}
};

template <class T> struct ptr;
template <class T> struct ref;
template <class T> struct arr;

template <class T> struct value_of { using type = T; };
template <class T> struct value_of<ref<T>> { using type = std::remove_cv_t<T>; };
// The value type of an expression: T for a ref<T>, else the type itself.
template <class T> using value_t = typename value_of<std::remove_cv_t<std::remove_reference_t<T>>>::type;
template <class T> struct same { using type = T; };  // blocks template argument deduction

// emu::val(e): e itself, or the value a ref<T> reads. emulator.py wraps the
// operands of every ?: and the initializer of every `auto x =` in it, so that
// `c ? p[i] : 0` is a float, not an int, and `auto v = p[i]` a copy.
template <class T>
constexpr T&& val(T&& x) { return static_cast<T&&>(x); }
template <class T>
std::remove_cv_t<T> val(const ref<T>& r) { return r; }
template <class T>
std::remove_cv_t<T> val(ref<T>& r) { return r; }
template <class T>
std::remove_cv_t<T> val(ref<T>&& r) { return r; }

// A[i] as the right kind of checked element: arr<U> if U is an array, else ref<U>.
template <class T, bool = std::is_array_v<T>> struct element { using type = ref<T>; };
template <class T> struct element<T, true> { using type = arr<T>; };
template <class T> using element_t = typename element<T>::type;

template <class T>
struct ref {
    using value_type = std::remove_cv_t<T>;
    T* a;
    Region* r;
    int line;
    bool bad;

    ref(T* a_, Region* r_, int line_, bool bad_) : a(a_), r(r_), line(line_), bad(bad_) {}
    ref(const ref&) = default;
    void touch(int kind) const {
        if (!r) return;
        size_t off = reinterpret_cast<const char*>(a) - r->base;  // "negative": huge
        if (r->shadowed || bad || off > r->bytes || sizeof(T) > r->bytes - off)
            access(r, a, sizeof(T), kind, line, bad);
    }

    operator value_type() const {
        touch(READ);
        return *a;
    }
    ref& operator=(const ref& o) {
        value_type v = o;
        touch(WRITE);
        *a = v;
        return *this;
    }
    template <class V>
    ref& operator=(const V& o) {
        value_type v = val(o);
        touch(WRITE);
        *a = v;
        return *this;
    }
#define EMU_COMPOUND(op)                 \
    template <class V>                   \
    ref& operator op(const V& o) {       \
        auto v = val(o);                 \
        touch(READ_WRITE);               \
        *a op v;                         \
        return *this;                    \
    }
    EMU_COMPOUND(+=) EMU_COMPOUND(-=) EMU_COMPOUND(*=) EMU_COMPOUND(/=) EMU_COMPOUND(%=)
    EMU_COMPOUND(&=) EMU_COMPOUND(|=) EMU_COMPOUND(^=) EMU_COMPOUND(<<=) EMU_COMPOUND(>>=)
#undef EMU_COMPOUND
    ref& operator++() { touch(READ_WRITE); ++*a; return *this; }
    ref& operator--() { touch(READ_WRITE); --*a; return *this; }
    value_type operator++(int) { touch(READ_WRITE); return (*a)++; }
    value_type operator--(int) { touch(READ_WRITE); return (*a)--; }
    ptr<T> operator&() const { return ptr<T>(a, r); }
};

template <class T>
element_t<T> make_element(T* a, Region* r, int line, bool bad) {
    if constexpr (std::is_array_v<T>)
        return arr<T>(*a, r, line, bad);
    else
        return ref<T>(a, r, line, bad);
}

// A view of an array U[N] (a __shared__ array, or a row of one).
template <class U, size_t N>
struct arr<U[N]> {
    U* data;  // the first element
    Region* r;
    int line;
    bool bad;

    arr(U* d, Region* r_, int line_ = 0, bool bad_ = false) : data(d), r(r_), line(line_), bad(bad_) {}
    element_t<U> operator[](Index i) const {
        bool b = bad;
        if (r && (unsigned long long)i.v >= N) {
            note_bad_index(r, int(std::rank_v<U[N]>), i.v, (long long)N, i.line);
            b = true;
        }
        return make_element<U>(data + i.v, r, i.line, b);
    }
    element_t<U> operator*() const { return (*this)[0]; }
    template <class V, std::enable_if_t<std::is_convertible_v<U*, V*>, int> = 0>
    operator ptr<V>() const { return ptr<V>(data, r); }
    ptr<U> operator+(long long n) const { return ptr<U>(data, r) + n; }
    ptr<U[N]> operator&() const { return ptr<U[N]>(reinterpret_cast<U(*)[N]>(data), r); }
};

template <class T>
struct ptr {
    T* p = nullptr;
    Region* r = nullptr;

    ptr() = default;
    ptr(T* raw) : p(raw) {}  // e.g. the address of a local: not checked
    ptr(T* raw, Region* r_) : p(raw), r(r_) {}
    template <class U, std::enable_if_t<std::is_convertible_v<U*, T*>, int> = 0>
    ptr(const ptr<U>& o) : p(o.p), r(o.r) {}
    // (T*) and reinterpret_cast to another type keep the Region
    template <class U, std::enable_if_t<!std::is_convertible_v<U*, T*>, int> = 0>
    explicit ptr(const ptr<U>& o) : p(reinterpret_cast<T*>(o.p)), r(o.r) {}
    template <class U, std::enable_if_t<!std::is_convertible_v<U*, T*>, int> = 0>
    explicit ptr(U* o) : p(reinterpret_cast<T*>(o)) {}

    element_t<T> operator[](Index i) const { return make_element<T>(p + i.v, r, i.line, false); }
    element_t<T> operator*() const { return make_element<T>(p, r, 0, false); }
    T* operator->() const {  // a member access: bounds only (which member is not known)
        if (r) access(r, p, sizeof(T), MEMBER, 0, false);
        return p;
    }
    explicit operator bool() const { return p != nullptr; }

    ptr operator+(long long n) const { return ptr(p + n, r); }
    ptr operator-(long long n) const { return ptr(p - n, r); }
    friend ptr operator+(long long n, const ptr& q) { return ptr(q.p + n, q.r); }
    friend ptrdiff_t operator-(const ptr& a, const ptr& b) { return a.p - b.p; }
    ptr& operator+=(long long n) { p += n; return *this; }
    ptr& operator-=(long long n) { p -= n; return *this; }
    ptr& operator++() { ++p; return *this; }
    ptr& operator--() { --p; return *this; }
    ptr operator++(int) { ptr o = *this; ++p; return o; }
    ptr operator--(int) { ptr o = *this; --p; return o; }
    friend bool operator==(const ptr& a, const ptr& b) { return a.p == b.p; }
    friend bool operator!=(const ptr& a, const ptr& b) { return a.p != b.p; }
    friend bool operator<(const ptr& a, const ptr& b) { return a.p < b.p; }
    friend bool operator<=(const ptr& a, const ptr& b) { return a.p <= b.p; }
    friend bool operator>(const ptr& a, const ptr& b) { return a.p > b.p; }
    friend bool operator>=(const ptr& a, const ptr& b) { return a.p >= b.p; }
};

// `reinterpret_cast<const float4*>(p)` is rewritten to emu::reinterpret<const float4>(p).
template <class T, class U>
ptr<T> reinterpret(const ptr<U>& p) { return ptr<T>(p); }
template <class T, class U>
ptr<T> reinterpret(U* p) { return ptr<T>(p); }

// The dimensions of an array type, outermost first.
template <class T, size_t... D>
struct dims_of { static constexpr long long value[sizeof...(D) + 1] = {(long long)D..., 0}; };
template <class T, size_t... D> struct dims_of<T[], D...>;
template <class U, size_t N, size_t... D>
struct dims_of<U[N], D...> : dims_of<U, D..., N> {};

// `__shared__ float tile[8][33];` is rewritten by emulator.py into
// `emu::arr<float[8][33]> tile = emu::shared_array<float[8][33]>(ID, "tile", "float");`:
// every thread of the block gets a view of the same storage, a new one (full
// of 0xFF bytes) for every block.
template <class T>
arr<T> shared_array(int id, const char* name, const char* type) {
    using E = std::remove_all_extents_t<T>;
    Region* r = nullptr;
    void* p = shared_slot(id, sizeof(T), alignof(T), sizeof(E), name, type,
                          int(std::rank_v<T>), dims_of<T>::value, &r);
    return arr<T>(*static_cast<T*>(p), r);
}
// `__shared__ float total;` becomes `emu::ref<float> total = emu::shared_scalar<float>(ID, ...)`.
template <class T>
ref<T> shared_scalar(int id, const char* name, const char* type) {
    Region* r = nullptr;
    void* p = shared_slot(id, sizeof(T), alignof(T), sizeof(T), name, type, 0, nullptr, &r);
    return ref<T>(static_cast<T*>(p), r, 0, false);
}
// `extern __shared__ float smem[];` becomes
// `emu::ptr<float> smem = emu::dynamic_shared<float>("smem", "float");`.
template <class T>
ptr<T> dynamic_shared(const char* name, const char* type) {
    Region* r = nullptr;
    void* p = dynamic_shared_memory(sizeof(T), name, type, &r);
    return ptr<T>(static_cast<T*>(p), r);
}

}  // namespace emu
