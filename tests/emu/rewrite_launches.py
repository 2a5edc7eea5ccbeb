#!/usr/bin/env python3
"""Copy include/lrkernels for the host emulator (tests/emu/emu.h), rewriting what a host
compiler cannot take:

  kernel<Args><<<grid, block[, smem[, stream]]>>>(a, b);
      -> ::emu::launch(::emu::LaunchConfig(grid, block[, smem[, stream]]), kernel<Args>, a, b);
  #if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= NNN      -> #if 1  (the emulator is "sm_NNN+")
  #include <mma.h>                                       -> dropped (emu.h provides nvcuda::wmma)

Line numbers are kept (launches spanning lines keep their line breaks), so compiler messages
point at the same lines as in the original headers.

Fails loudly (exit status 1, one message per problem) on any `<<<` in code that is not a
complete `name<...><<<config>>>(args);` statement, and on any other use of __CUDA_ARCH__: a
launch or an arch branch the emulator cannot see must not compile into a silent no-op.
Comments and string literals are ignored.

Usage: rewrite_launches.py SRC_DIR DST_DIR   (copies SRC_DIR/lrkernels to DST_DIR/lrkernels)
       rewrite_launches.py --self-test
"""

import os
import re
import shutil
import sys

ARCH_GUARD = re.compile(r"^[ \t]*#[ \t]*if[ \t]+defined[ \t]*\([ \t]*__CUDA_ARCH__[ \t]*\)[ \t]*&&"
                        r"[ \t]*__CUDA_ARCH__[ \t]*>=[ \t]*\d+[ \t]*(//.*)?$")
MMA_INCLUDE = re.compile(r"^[ \t]*#[ \t]*include[ \t]*<mma\.h>[ \t]*(//.*)?$")
IDENT_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_:")


class RewriteError(Exception):
    pass


def code_mask(text):
    """mask[i] is True where text[i] is code (not inside a comment, string or char literal)."""
    mask = [True] * len(text)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            j = min(j + 1, n)
        else:
            i += 1
            continue
        for k in range(i, j):
            mask[k] = False
        i = j
    return mask


def line_of(text, pos):
    return text.count("\n", 0, pos) + 1


def match_back(text, mask, close_pos, open_ch, close_ch):
    """Position of the open_ch matching text[close_pos] == close_ch, scanning backwards."""
    depth = 0
    for i in range(close_pos, -1, -1):
        if not mask[i]:
            continue
        if text[i] == close_ch:
            depth += 1
        elif text[i] == open_ch:
            depth -= 1
            if depth == 0:
                return i
        elif text[i] in ";{}":
            break
    return -1


def match_forward(text, mask, open_pos, open_ch, close_ch):
    depth = 0
    for i in range(open_pos, len(text)):
        if not mask[i]:
            continue
        if text[i] == open_ch:
            depth += 1
        elif text[i] == close_ch:
            depth -= 1
            if depth == 0:
                return i
        elif text[i] == ";":
            break
    return -1


def rewrite_launch(text, mask, pos):
    """Rewrites the launch whose `<<<` is at pos: returns (start, end, replacement)."""
    # the kernel: an identifier (with ::), optionally followed by <template arguments>
    k = pos - 1
    while k >= 0 and text[k].isspace():
        k -= 1
    kernel_end = k + 1
    if k >= 0 and text[k] == ">":
        k = match_back(text, mask, k, "<", ">")
        if k < 0:
            raise RewriteError("unbalanced template arguments before <<<")
        k -= 1
        while k >= 0 and text[k].isspace():
            k -= 1
    name_end = k + 1
    while k >= 0 and text[k] in IDENT_CHARS and mask[k]:
        k -= 1
    start = k + 1
    name = text[start:name_end]
    if not re.fullmatch(r"(::)?[A-Za-z_]\w*(::[A-Za-z_]\w*)*", name):
        raise RewriteError("no kernel name before <<<")
    # the configuration, up to the first >>> in code
    cfg_end = pos + 3
    while True:
        cfg_end = text.find(">>>", cfg_end)
        if cfg_end < 0:
            raise RewriteError("no matching >>>")
        if mask[cfg_end]:
            break
        cfg_end += 3
    config = text[pos + 3:cfg_end]
    if ";" in config or "<<<" in config or not config.strip():
        raise RewriteError("malformed launch configuration")
    # the arguments: ( ... ) then ;
    a = cfg_end + 3
    while a < len(text) and text[a].isspace():
        a += 1
    if a >= len(text) or text[a] != "(":
        raise RewriteError("no argument list after >>>")
    a_end = match_forward(text, mask, a, "(", ")")
    if a_end < 0:
        raise RewriteError("unbalanced argument list")
    end = a_end + 1
    while end < len(text) and text[end].isspace() and text[end] != "\n":
        end += 1
    if end >= len(text) or text[end] != ";":
        raise RewriteError("the launch is not a statement of its own (no ';' after the arguments)")
    args = text[a + 1:a_end]
    kernel = text[start:kernel_end]
    between = text[kernel_end:pos] + text[cfg_end + 3:a]  # whitespace: keep its line breaks
    newlines = "\n" * between.count("\n")
    replacement = "::emu::launch(::emu::LaunchConfig(" + config + "), " + kernel
    if args.strip():
        replacement += ", " + args
    replacement += ");" + newlines
    return start, end + 1, replacement


def rewrite_text(text, filename="<text>"):
    """Returns (rewritten text, list of error messages)."""
    errors = []
    # preprocessor lines first (line by line, the line count never changes)
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if ARCH_GUARD.match(line):
            lines[i] = "#if 1  // emu: was " + line.strip()
        elif MMA_INCLUDE.match(line):
            lines[i] = "// emu: <mma.h> dropped, emu.h provides nvcuda::wmma"
    text = "\n".join(lines)
    mask = code_mask(text)
    for m in re.finditer(r"__CUDA_ARCH__", text):
        if mask[m.start()]:
            errors.append(f"{filename}:{line_of(text, m.start())}: __CUDA_ARCH__ outside a recognised "
                          f"'#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= N' guard")
    out, last = [], 0
    pos = 0
    while True:
        pos = text.find("<<<", pos)
        if pos < 0:
            break
        if not mask[pos]:
            pos += 3
            continue
        try:
            start, end, replacement = rewrite_launch(text, mask, pos)
        except RewriteError as e:
            line = text[text.rfind("\n", 0, pos) + 1:text.find("\n", pos)].strip()
            errors.append(f"{filename}:{line_of(text, pos)}: cannot rewrite this kernel launch for the "
                          f"emulator ({e}): {line}")
            pos += 3
            continue
        out.append(text[last:start])
        out.append(replacement)
        last = pos = end
    out.append(text[last:])
    result = "".join(out)
    if not errors:
        result_mask = code_mask(result)
        for p in (m.start() for m in re.finditer(r"<<<|>>>", result) if result_mask[m.start()]):
            errors.append(f"{filename}: '{result[p:p + 3]}' left in code after the rewrite "
                          f"(line {line_of(result, p)})")
    return result, errors


def rewrite_tree(src_dir, dst_dir):
    """Writes the rewritten copy only when every file rewrote cleanly; on an error the copy is
    removed, so a build cannot go on with stale or half-written headers."""
    src = os.path.join(src_dir, "lrkernels")
    dst = os.path.join(dst_dir, "lrkernels")
    if not os.path.isdir(src):
        print(f"rewrite_launches: {src} is not a directory", file=sys.stderr)
        return 1
    outputs, errors, launches = {}, [], 0
    for root, _dirs, files in os.walk(src):
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, src_dir)
            with open(path, "rb") as f:
                data = f.read()
            if name.endswith((".h", ".cuh", ".hpp")):
                result, errs = rewrite_text(data.decode("utf-8"), rel)
                errors += errs
                launches += result.count("::emu::launch(")
                data = result.encode("utf-8")
            outputs[os.path.join(dst_dir, rel)] = data
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    if errors:
        for e in errors:
            print("rewrite_launches: error: " + e, file=sys.stderr)
        print(f"rewrite_launches: {len(errors)} error(s); the emulator tests cannot be built from "
              f"these headers", file=sys.stderr)
        return 1
    for out_path, data in outputs.items():
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        with open(out_path, "wb") as f:
            f.write(data)
    print(f"rewrite_launches: {launches} kernel launches rewritten into {dst}")
    return 0


def self_test():
    """The rewriter's own test: rewrites what it should, refuses what it cannot rewrite."""
    good = {
        "k<T, 16><<<grid, kThreads, 0, stream>>>(p);":
            "::emu::launch(::emu::LaunchConfig(grid, kThreads, 0, stream), k<T, 16>, p);",
        "  ns::k<<<g, b>>>(p, n);  // comment <<<":
            "  ::emu::launch(::emu::LaunchConfig(g, b), ns::k, p, n);  // comment <<<",
        "k<A<B>, 2><<<f(x, y),\n    128, 0, s>>>(a,\n    b);\nnext();":
            "::emu::launch(::emu::LaunchConfig(f(x, y),\n    128, 0, s), k<A<B>, 2>, a,\n    b);\nnext();",
        "k<<<1, 1>>>();": "::emu::launch(::emu::LaunchConfig(1, 1), k);",
        "/* k<<<1, 1>>>(p); */ const char* s = \"<<<\";": "/* k<<<1, 1>>>(p); */ const char* s = \"<<<\";",
        "#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800\n#endif":
            "#if 1  // emu: was #if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800\n#endif",
    }
    bad = [
        "auto e = (k<<<g, b>>>(p), cudaGetLastError());",  # launch inside an expression
        "KERNEL_LAUNCH(k)<<<g, b>>>(p);",                 # kernel from a macro call
        "k<<<g, b>>>(p)",                                 # no ';'
        "k<<<g, b>>> p;",                                 # no argument list
        "k<<<g, b>(p);",                                  # no >>>
        "#if __CUDA_ARCH__ >= 900\n#endif",               # unknown arch guard
    ]
    failures = 0
    for src, want in good.items():
        got, errs = rewrite_text(src)
        if errs or got != want:
            failures += 1
            print(f"self-test FAIL: {src!r}\n  got  {got!r}\n  want {want!r}\n  errors {errs}")
    for src in bad:
        _, errs = rewrite_text(src)
        if not errs:
            failures += 1
            print(f"self-test FAIL: {src!r} was accepted")
    print(f"rewrite_launches self-test: {len(good)} rewrites, {len(bad)} rejections, {failures} failures")
    return 1 if failures else 0


def main(argv):
    if len(argv) == 2 and argv[1] == "--self-test":
        return self_test()
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    return rewrite_tree(argv[1], argv[2])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
