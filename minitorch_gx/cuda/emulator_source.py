"""How the emulator turns a ``kernels/*.cu`` file into C++ for g++ (``translate``).

The .cu file stays plain CUDA (NVRTC compiles it unchanged); the rewriting
happens on its text, comments blanked first so that line numbers hold:

  - ``__shared__ real t[8][33];`` becomes a checked per-block array view,
    ``emu::arr<real[8][33]> t = emu::shared_array<real[8][33]>(ID, "t", "real");``,
    and ``extern __shared__ float s[];`` a checked pointer into the launch's
    dynamic shared memory (kernels/emu/cuda_emu.h);
  - every pointer type in a declaration, ``const real* __restrict__ x``,
    ``unsigned char* y``, ``int (*tab)[N]``, a ``(float4*)`` cast, becomes
    ``emu::ptr<...>``, which knows the array it points into, so that each
    access can be checked (memcheck, initcheck, racecheck);
  - the operands of ``?:`` and the initializer of ``auto x = ...`` are wrapped
    in ``emu::val(...)``: ``p[i]`` is a checked reference (a class), and C++
    would otherwise give ``c ? p[i] : 0`` the type int, or make ``auto v = p[i]``
    a reference instead of a copy;
  - each kernel gets C entry points for ctypes: launch, parameter types and
    parameter names.

Pointer types are recognised by their type names: the C scalar and vector
types, and the typedef, ``using``, struct, class and template-parameter names
of the file (``typedef REAL real;``). A pointer to a type the file does not
name this way stays a raw pointer, unchecked.
"""
import re

__all__ = ["TranslationError", "translate"]


class TranslationError(RuntimeError):
    """A construct the emulator's source translation cannot rewrite."""


_BUILTIN_TYPES = ["unsigned long long int", "unsigned long long", "long long int", "long long",
                  "unsigned long", "unsigned int", "unsigned short", "unsigned char",
                  "signed char", "unsigned", "long", "int", "short", "char", "bool", "float",
                  "double", "size_t", "ptrdiff_t", "int8_t", "uint8_t", "int16_t", "uint16_t",
                  "int32_t", "uint32_t", "int64_t", "uint64_t", "float2", "float4", "int2",
                  "int4", "uint2", "uint3", "uint4", "double2", "void"]
_BOUNDS = r"(?:__launch_bounds__\s*\([^)]*\)\s*)?"
KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+' + _BOUNDS + r"void\s+" + _BOUNDS +
                    r"(\w+)\s*\(")
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?"
                            r"([A-Za-z_][\w\s]*?)\s+(\w+)\s*\[\s*\]\s*;")
_SHARED = re.compile(r"(?:static\s+)?__shared__\s+(?:__align__\(\d+\)\s+)?"
                     r"([A-Za-z_][\w\s]*?)\s+(\w+)\s*((?:\[[^\]\n]+\])*)\s*;")
_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.DOTALL)
_CV = r"(?:(?:const|volatile)\s+)*"
_VISIBLE = '__attribute__((visibility("default")))'  # everything else is hidden


def _blank_comments(source):
    """Comments replaced by spaces (newlines kept), so regexes skip them and line numbers hold."""
    return _COMMENT.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), source)


def _type_names(code):
    """Every type name a pointer declaration in ``code`` may use."""
    names = set(_BUILTIN_TYPES)
    names.update(re.findall(r"\btypedef\s+[\w\s]+?\s+(\w+)\s*;", code))
    names.update(re.findall(r"\busing\s+(\w+)\s*=", code))
    names.update(re.findall(r"\b(?:struct|class|union)\s+(\w+)", code))
    for params in re.findall(r"\btemplate\s*<([^<>]*)>", code):
        names.update(re.findall(r"\b(?:class|typename)\s+(\w+)", params))
    builtin = "|".join(t.replace(" ", r"\s+") for t in _BUILTIN_TYPES)
    names.update(re.findall(rf"^[ \t]*#[ \t]*define[ \t]+(\w+)[ \t]+(?:{builtin})[ \t]*$", code,
                            re.MULTILINE))
    return names


def _type_pattern(names):
    alternatives = sorted(names, key=len, reverse=True)  # "unsigned char" before "char"
    return "(?:" + "|".join(re.escape(n).replace(r"\ ", r"\s+") for n in alternatives) + ")"


# --------------------------------------------------------------------------
# ?: operands and auto initializers -> emu::val(...)
# --------------------------------------------------------------------------
_OPEN, _CLOSE = "([{", ")]}"


def _scan_operand(text, i, stop_at_colon):
    """The end of the expression starting at text[i]: at a depth-0 ',' or ';',
    an unmatched closer, or (stop_at_colon) the ':' of this ?: ; None if the
    text does not look like one."""
    depth = nest = 0
    while i < len(text):
        ch = text[i]
        if ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            if depth == 0:
                return None if stop_at_colon else i
            depth -= 1
        elif depth == 0:
            if ch == ";" or (ch == "," and not stop_at_colon):
                return None if stop_at_colon else i
            if ch == "?":
                nest += 1
            elif ch == ":" and text[i + 1:i + 2] != ":" and text[i - 1:i] != ":":
                if nest == 0:
                    return i  # this ?:'s colon, or (the third operand) an outer one's
                nest -= 1
        i += 1
    return None if stop_at_colon else i


def _wrap_ternaries(text):
    out, i = [], 0
    while True:
        q = text.find("?", i)
        if q < 0:
            out.append(text[i:])
            return "".join(out)
        line_start = text.rfind("\n", 0, q) + 1
        directive = re.match(r"[ \t]*#[ \t]*(\w+)", text[line_start:q])
        colon = _scan_operand(text, q + 1, True)
        if colon is None or (directive and directive.group(1) != "define"):
            out.append(text[i:q + 1])
            i = q + 1
            continue
        end = _scan_operand(text, colon + 1, False)
        a, b = text[q + 1:colon], text[colon + 1:end]
        out.append(f"{text[i:q]}? emu::val({_wrap_ternaries(a)}) : "
                   f"emu::val({_wrap_ternaries(b)})")
        i = end


def _wrap_auto(text):
    out, i = [], 0
    for m in re.finditer(r"\bauto\s+\w+\s*=(?!=)", text):
        if m.start() < i:
            continue
        end = _scan_operand(text, m.end(), False)
        out.append(f"{text[i:m.end()]} emu::val({text[m.end():end].strip()})")
        i = end
    out.append(text[i:])
    return "".join(out)


# --------------------------------------------------------------------------
# Pointers -> emu::ptr<...>; __shared__ -> emu::arr / emu::ref / emu::ptr
# --------------------------------------------------------------------------
def _rewrite_shared(code, filename):
    counter = iter(range(1 << 20))

    def dynamic(m):
        t, name = m.group(1).strip(), m.group(2)
        return f'emu::ptr<{t}> {name} = emu::dynamic_shared<{t}>("{name}", "{t}");'

    def static(m):
        t, name, dims = m.group(1).strip(), m.group(2), m.group(3)
        if dims:
            return (f'emu::arr<{t}{dims}> {name} = '
                    f'emu::shared_array<{t}{dims}>({next(counter)}, "{name}", "{t}");')
        return (f'emu::ref<{t}> {name} = '
                f'emu::shared_scalar<{t}>({next(counter)}, "{name}", "{t}");')

    code = _EXTERN_SHARED.sub(dynamic, code)
    code = _SHARED.sub(static, code)
    if "__shared__" in code:
        line = code[:code.index("__shared__")].count("\n") + 1
        raise TranslationError(
            f"{filename}:{line}: a __shared__ declaration the emulator cannot rewrite "
            f"(write one variable per declaration: `__shared__ float a[N][M];`)")
    return code


def _rewrite_pointers(code):
    t = _type_pattern(_type_names(code))
    post = r"((?:\s+(?:const|volatile))*)"
    array_pointer = re.compile(rf"(?<![\w:])({_CV})({t}){post}\s*\(\s*\*\s*(\w+)\s*\)\s*"
                               r"((?:\[[^\]\n]+\])+)")
    code = array_pointer.sub(lambda m: f"emu::ptr<{m[1]}{m[2]}{m[3]}{m[5]}> {m[4]}", code)

    def typed(template):  # void* carries no element type to check: left alone
        return lambda m: m[0] if m[2] == "void" else template.format(f"{m[1]}{m[2]}{m[3]}")

    cast = re.compile(rf"\(\s*({_CV})({t}){post}\s*\*\s*\)")
    code = cast.sub(typed("(emu::ptr<{}>)"), code)
    reinterpret = re.compile(rf"\breinterpret_cast\s*<\s*({_CV})({t}){post}\s*\*\s*>")
    code = reinterpret.sub(typed("emu::reinterpret<{}>"), code)
    declaration = re.compile(rf"(?<![\w:])({_CV})({t}){post}\s*\*\s*({_CV})"
                             r"(?:__restrict__|__restrict)?\s*(?=[A-Za-z_])")

    def pointer(m):
        if m[2] == "void":
            return m[0]
        return f"{'const ' if m[4].strip() else ''}emu::ptr<{m[1]}{m[2]}{m[3]}> "

    return declaration.sub(pointer, code)


def _parameters(code, open_paren):
    """The parameter names of the function whose '(' is at open_paren."""
    depth, i = 0, open_paren
    while True:
        depth += {"(": 1, ")": -1}.get(code[i], 0)
        if depth == 0:
            break
        i += 1
    names, depth, start = [], 0, open_paren + 1
    for j in range(open_paren + 1, i + 1):
        ch = code[j]
        if ch in "(<[":
            depth += 1
        elif ch in ")>]" and j < i:
            depth -= 1
        if (ch == "," and depth == 0) or j == i:
            found = re.findall(r"[A-Za-z_]\w*", code[start:j])
            if found:
                names.append(found[-1])
            start = j + 1
    return names


def translate(source, filename="<kernel>"):
    """Return (C++ text, {kernel name: parameter names}) for a .cu source."""
    code = _blank_comments(source)
    code = _wrap_auto(_wrap_ternaries(code))
    code = _rewrite_shared(code, filename)
    code = _rewrite_pointers(code)
    kernels = {m.group(1): _parameters(code, m.end() - 1) for m in KERNEL.finditer(code)}
    if not kernels:
        raise TranslationError(f"{filename}: no `extern \"C\" __global__ void` kernel found")
    entry = ["", "// ---- emulator entry points (generated) ----"]
    for name, params in kernels.items():
        entry.append(
            f'extern "C" {_VISIBLE} int emu_launch_{name}(const unsigned* dims, '
            f'unsigned long long smem, unsigned long long stack, void** args, '
            f'const emu::ArgInfo* info, const emu::Options* options, char* err, int errlen) '
            f'{{ return emu::launch(&{name}, dims, smem, stack, args, info, options, err, '
            f'errlen); }}')
        entry.append(f'extern "C" {_VISIBLE} const char* emu_signature_{name}() '
                     f'{{ return emu::signature(&{name}); }}')
        entry.append(f'extern "C" {_VISIBLE} const char* emu_parameters_{name}() '
                     f'{{ return "{",".join(params)}"; }}')
    text = f'#line 1 "{filename}"\n' + code + "\n".join(entry) + "\n"
    return text, kernels
