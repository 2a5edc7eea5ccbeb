"""Build lrkernels._C with torch.utils.cpp_extension (ninja when available).

Environment switches:
  LRKERNELS_CUDA=1 / 0   force the CUDA build on or off (default: on when nvcc and a CUDA
                         build of torch are both present)
  CUDA_HOME              the CUDA toolkit to use (default: found from nvcc, see below)
  TORCH_CUDA_ARCH_LIST   CUDA targets, as torch.utils.cpp_extension reads them (e.g. "8.0;9.0+PTX").
                         Default: the compute capabilities of the GPUs visible at build time (PTX
                         added for the newest), or, with no GPU (CI), DEFAULT_CUDA_ARCH_LIST below.
  MAX_JOBS               parallel compile jobs (ninja)
  LRKERNELS_DEBUG=1      -O0 -g host code, -lineinfo device code
  LRKERNELS_CPU_ISAS     instruction sets the vectorised CPU kernels are compiled for, comma-
                         separated (default: default,avx2,avx512 on x86-64, default elsewhere)

The sources are every csrc/**/*.cpp, plus csrc/**/*.cu in the CUDA build: one list, so the
CPU-only and CUDA builds cannot drift apart. A csrc/**/*_cpu_vec.cpp source is compiled once per
CPU instruction set, through a wrapper generated under build/lrk_isa/, with that set's flags
(see csrc/common/cpu_vec.h); the ops pick the copy to run at run time. Each backend file registers its own kernels
(TORCH_LIBRARY_IMPL), so a CPU-only build leaves a clean "no CUDA kernel" error.
"""

import glob
import os
import platform
import re
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _is_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_toolkit():
    """The directory holding bin/nvcc and include/cuda_runtime.h, or None.

    `nvcc` on PATH may be a small wrapper script (as on the CI machines), in which case
    torch's guess (dirname of dirname of `which nvcc`) is wrong: follow the symlink, then
    look inside the script for the real nvcc, then try the usual install locations.
    """
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        if not _is_toolkit(env):
            sys.exit(f"lrkernels setup: CUDA_HOME={env} has no bin/nvcc and include/cuda_runtime.h")
        return env
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:
            with open(real, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                for m in re.finditer(rb"(/[^\s\"']+)/bin/nvcc", head):
                    candidates.append(m.group(1).decode())
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if _is_toolkit(c):
            return os.path.realpath(c)
    return None


def nvidia_wheel_dirs():
    """include/ and lib/ folders of the nvidia-* wheels (cuBLAS, cuFFT headers live there
    when the toolkit itself is a minimal one)."""
    incs, libs = [], []
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    for root in roots:
        for d in sorted(glob.glob(os.path.join(root, "nvidia", "*"))):
            if os.path.isdir(os.path.join(d, "include")):
                incs.append(os.path.join(d, "include"))
            if os.path.isdir(os.path.join(d, "lib")):
                libs.append(os.path.join(d, "lib"))
    return incs, libs


def resolve_build():
    want = os.environ.get("LRKERNELS_CUDA", "auto").lower()
    if want not in ("auto", "0", "1"):
        sys.exit(f"lrkernels setup: LRKERNELS_CUDA must be 0, 1 or unset, got {want!r}")
    cuda_home = find_cuda_toolkit() if want != "0" else None
    if cuda_home:
        # must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
        os.environ["CUDA_HOME"] = cuda_home
    import torch

    torch_has_cuda = torch.version.cuda is not None
    use_cuda = cuda_home is not None and torch_has_cuda
    if want == "1" and not use_cuda:
        why = "no CUDA toolkit found (set CUDA_HOME)" if cuda_home is None else \
            f"torch {torch.__version__} is a CPU-only build"
        sys.exit(f"lrkernels setup: LRKERNELS_CUDA=1 but {why}")
    return use_cuda, cuda_home


USE_CUDA, CUDA_HOME = resolve_build()

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

# Without a GPU to build for: SASS for sm_80 and sm_90, PTX for compute_90. sm_80 SASS also runs
# on sm_86 / sm_89 (A10, A40, L4, L40, RTX 30xx/40xx: same major version, binary compatible),
# sm_90 SASS on the H100/H200, and the PTX is JIT-compiled on anything newer, so A100, L40, RTX
# 4090 and H200 users all get a kernel image; the tensor-core bodies need sm_80+ and the host
# checks the loaded image's arch before taking them (include/lrkernels/common/kernel_select.h).
# Two device passes instead of four (8.0;8.6;8.9;9.0+PTX) keep CI's 2-core build in budget; a
# build for one's own GPU (the default when one is visible) gets native SASS for it.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def cuda_arch_list():
    """TORCH_CUDA_ARCH_LIST when set; else the visible GPUs' capabilities (+PTX on the newest),
    as torch.utils.cpp_extension itself would pick; else DEFAULT_CUDA_ARCH_LIST."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        return env, "TORCH_CUDA_ARCH_LIST"
    import torch

    try:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(n)})
    except Exception:  # no driver, a broken one: build for the documented default
        caps = []
    if caps:
        return ";".join(f"{a}.{b}" for a, b in caps) + "+PTX", "the visible GPUs"
    return DEFAULT_CUDA_ARCH_LIST, "the default list (no GPU visible)"


if USE_CUDA:
    _arch, _arch_source = cuda_arch_list()
    os.environ["TORCH_CUDA_ARCH_LIST"] = _arch  # read by torch.utils.cpp_extension at build time
DEBUG = os.environ.get("LRKERNELS_DEBUG", "0") == "1"

# ---- CPU instruction sets: every *_cpu_vec.cpp once per set, through a generated wrapper ----
ISA_FLAGS = {
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "avx2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
               "-mavx512dq", "-mfma", "-mf16c"],
}
_x86 = platform.machine().lower() in ("x86_64", "amd64")
_isa_env = os.environ.get("LRKERNELS_CPU_ISAS")
CPU_ISAS = ([i.strip().lower() for i in _isa_env.split(",") if i.strip()] if _isa_env
            else (["default", "avx2", "avx512"] if _x86 else ["default"]))
if "default" not in CPU_ISAS or any(i not in ISA_FLAGS for i in CPU_ISAS) or (not _x86 and CPU_ISAS != ["default"]):
    sys.exit(f"lrkernels setup: LRKERNELS_CPU_ISAS must list 'default' and, on x86-64 only, any of avx2, avx512; "
             f"got {CPU_ISAS}")
ISA_DIR = os.path.join(ROOT, "build", "lrk_isa")


def isa_wrappers(vec_sources):
    """One wrapper per (source, instruction set); rewritten only when its text changes, so
    incremental builds stay incremental."""
    out = []
    for src in vec_sources:
        for isa in CPU_ISAS:
            path = os.path.join(ISA_DIR, os.path.splitext(src)[0] + f".{isa}.cpp")
            text = (f"// generated by setup.py: {src} for the {isa} instruction set\n"
                    f'#include "{os.path.join(ROOT, src)}"\n')
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if not os.path.exists(path) or open(path).read() != text:
                with open(path, "w") as f:
                    f.write(text)
            out.append(path)
    return out


def isa_flags_for(source):
    """The extra compiler flags of a generated wrapper (none for every other source)."""
    source = os.path.abspath(source)
    if not source.startswith(ISA_DIR + os.sep):
        return []
    isa = source.rsplit(".", 2)[-2]
    # at::vec's headers carry `#pragma unroll` and clang pragmas GCC does not know
    return ISA_FLAGS[isa] + [f"-DLRK_ISA_NS=isa_{isa}", "-Wno-unknown-pragmas"]


def _patch_ninja_writer():
    """torch writes one ninja file with the same flags for every C++ source; append each
    wrapper's instruction-set flags to its own build statement (ninja build-level binding)."""
    import torch.utils.cpp_extension as cpp_ext

    original = cpp_ext._write_ninja_file

    def write(path, *args, **kwargs):
        original(path, *args, **kwargs)
        with open(path) as f:
            lines = f.read().split("\n")
        out = []
        for line in lines:
            out.append(line)
            m = re.match(r"build (.+?): compile (.+)$", line)
            if m:
                flags = isa_flags_for(m.group(2).replace("$ ", " "))
                if flags:
                    out.append("  post_cflags = $post_cflags " + " ".join(flags))
        with open(path, "w") as f:
            f.write("\n".join(out))

    cpp_ext._write_ninja_file = write


_patch_ninja_writer()

vec_sources = sorted(glob.glob("csrc/**/*_cpu_vec.cpp", recursive=True))
# wrappers last: where an inline function is emitted by several objects the linker keeps the
# first copy, which is then the baseline-ISA one
cpp_sources = sorted(set(glob.glob("csrc/**/*.cpp", recursive=True)) - set(vec_sources)) + isa_wrappers(vec_sources)
cu_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
include_dirs = [os.path.join(ROOT, "include"), os.path.join(ROOT, "csrc")]
cxx_flags = ["-O0", "-g"] if DEBUG else ["-O3"]
cxx_flags += ["-std=c++20", "-fopenmp"]
define_macros = [("LRKERNELS_WITH_CUDA", "1" if USE_CUDA else "0"),
                 ("LRK_ISA_COMPILED_AVX2", "1" if "avx2" in CPU_ISAS else "0"),
                 ("LRK_ISA_COMPILED_AVX512", "1" if "avx512" in CPU_ISAS else "0")]

if USE_CUDA:
    wheel_incs, wheel_libs = nvidia_wheel_dirs()
    # no --use_fast_math: the kernels are memory-bound, and exact sqrt/division and denormals
    # keep them equal to the CPU kernels (e.g. Adam with eps = 0 on tiny gradients)
    nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr",
                  "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                  "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__"]
    if DEBUG:
        nvcc_flags.append("-lineinfo")
    # cuFFT is linked by soname: the wheels ship libcufft.so.N without the unversioned link.
    cufft = None
    for d in [os.path.join(CUDA_HOME, "lib64")] + wheel_libs:
        hits = sorted(glob.glob(os.path.join(d, "libcufft.so*")))
        if hits:
            cufft = (d, os.path.basename(hits[0]))
            break
    extra_link = []
    if cufft:
        # rpath: the wheel's lib folder as found now, and relative to an installed package
        # (site-packages/lrkernels/_C.so -> site-packages/nvidia/cu13/lib); torch usually has
        # loaded cuFFT already, this makes the extension load on its own too.
        extra_link = [f"-L{cufft[0]}", f"-l:{cufft[1]}", f"-Wl,-rpath,{cufft[0]}",
                      "-Wl,-rpath,$ORIGIN/../nvidia/cu13/lib"]
    # '_' between entries: nvcc splits a -D value at commas, and ';' or ' ' would need shell
    # quoting; build_info() turns the '_' back into ';'
    arch = re.sub(r"[;,\s]+", "_", os.environ["TORCH_CUDA_ARCH_LIST"].strip())
    define_macros.append(("LRKERNELS_CUDA_ARCH_LIST", arch))
    ext = CUDAExtension(
        "lrkernels._C",
        cpp_sources + cu_sources,
        # the toolkit's own headers first; the wheels only fill in what it lacks (cuBLAS, cuFFT)
        include_dirs=include_dirs + [os.path.join(CUDA_HOME, "include")] + wheel_incs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"] + extra_link,
    )
else:
    wheel_incs = []
    ext = CppExtension(
        "lrkernels._C",
        cpp_sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )

class LrkBuildExtension(BuildExtension):
    """BuildExtension plus the per-wrapper instruction-set flags when ninja is not used (the
    ninja path gets them from _patch_ninja_writer)."""

    def build_extensions(self):
        original = self.compiler._compile

        def compile_one(obj, src, ext, cc_args, extra_postargs, pp_opts):
            flags = isa_flags_for(src)
            if flags:
                if isinstance(extra_postargs, dict):  # torch's per-language flag dict
                    extra_postargs = dict(extra_postargs, cxx=list(extra_postargs.get("cxx", [])) + flags)
                else:
                    extra_postargs = list(extra_postargs or []) + flags
            return original(obj, src, ext, cc_args, extra_postargs, pp_opts)

        self.compiler._compile = compile_one
        super().build_extensions()


print("lrkernels setup: CUDA build: %s" % ("yes" if USE_CUDA else "no"))
if USE_CUDA:
    print(f"lrkernels setup: CUDA_HOME={CUDA_HOME}")
    print(f"lrkernels setup: TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} (from {_arch_source})")
    print(f"lrkernels setup: extra include dirs from nvidia wheels: {wheel_incs}")
print(f"lrkernels setup: CPU instruction sets for the vectorised kernels: {','.join(CPU_ISAS)}")
print(f"lrkernels setup: {len(cpp_sources)} C++ and {len(cu_sources) if USE_CUDA else 0} CUDA sources")

setup(
    name="lrkernels",
    version="0.1.0",
    description="Fast, correct kernels for low-rank methods (LoRA, multi-LoRA, GaLore, C3A) in PyTorch",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[ext],
    cmdclass={"build_ext": LrkBuildExtension},  # uses ninja when it is installed
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy"],
    extras_require={"nvtx": ["nvtx"], "test": ["pytest", "peft"], "transformers": ["transformers>=5"],
                    "peft": ["peft"], "models": ["transformers>=5", "gguf"]},
    zip_safe=False,
)
