"""What the machine code (SASS) of the built CUDA kernels says, read without a GPU.

The CUDA kernels compile and link on machines that cannot run them (CI has the toolkit, no GPU),
so the properties that decide whether they reach their bandwidth goals are checked statically,
per kernel and per architecture of the build (tests/test_sass.py, and `make gpu-check`):
  - local memory (LDL / STL, the code of register spills and of arrays indexed at run time): none;
  - registers against the launch bounds the kernel declares (EIATTR_MAX_THREADS in the ELF);
  - the hardware exp (MUFU.EX2) where a kernel is meant to use it.

The tools: cuobjdump from the toolkit, PATH, or the copy the triton wheel ships (torch depends on
triton; the toolkit on these machines has no cuobjdump), and c++filt (binutils) for readable names.
"""

import collections
import dataclasses
import os
import re
import shutil
import subprocess
from typing import Dict, List, Optional, Tuple

import build_support

REGISTERS_PER_SM = 65536  # every architecture of the build (sm_80, sm_86, sm_89, sm_90)
# Opcodes that touch local memory: spills, or a per-thread array the compiler could not keep in registers.
LOCAL_MEMORY_OPCODES = ("LDL", "STL")


@dataclasses.dataclass
class Kernel:
    """One kernel of one architecture in a fatbinary."""

    arch: str                     # "sm_90"
    mangled: str                  # the symbol
    name: str                     # demangled where c++filt exists, else the symbol
    registers: int = -1           # per thread (cuobjdump -res-usage REG)
    stack: int = 0                # bytes of stack frame per thread
    local: int = 0                # bytes of local memory per thread
    max_threads: Optional[int] = None  # threads per block its launch bounds allow (None: none declared)
    opcodes: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    @property
    def where(self) -> str:
        """How a message names it: demangled name and architecture."""
        return f"{self.name} [{self.arch}]"

    def local_memory_instructions(self) -> int:
        return sum(n for op, n in self.opcodes.items() if op.split(".")[0] in LOCAL_MEMORY_OPCODES)

    def register_limit(self, min_blocks: int = 1) -> Optional[int]:
        """Registers per thread that let ``min_blocks`` blocks of max_threads share one SM."""
        if not self.max_threads:
            return None
        return REGISTERS_PER_SM // (self.max_threads * min_blocks)


def find_tool(name: str) -> Optional[str]:
    """``name`` (cuobjdump, nvdisasm) from the toolkit, PATH, or triton's bundled copy; or None."""
    home = build_support.toolkit_home(os.environ)
    candidates = [os.path.join(home, "bin", name)] if home else []
    candidates.append(shutil.which(name))
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _run(args: List[str]) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True, timeout=300).stdout


def _demangle(symbols: List[str]) -> Dict[str, str]:
    tool = shutil.which("c++filt")
    if tool is None or not symbols:
        return {s: s for s in symbols}
    out = subprocess.run([tool], input="\n".join(symbols), capture_output=True, text=True, check=True,
                         timeout=60).stdout.splitlines()
    return dict(zip(symbols, out)) if len(out) == len(symbols) else {s: s for s in symbols}


_ARCH = re.compile(r"^arch = (sm_\d+[a-z]?)\s*$")
_SASS_FUNCTION = re.compile(r"^\s*Function : (\S+)\s*$")
_SASS_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)")
_RES_FUNCTION = re.compile(r"^\s*Function (\S+):\s*$")
_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:\d+\s+LOCAL:(\d+)")
_INFO_SECTION = re.compile(r"^\.nv\.info\.(\S+)\s*$")
_MAX_THREADS_VALUE = re.compile(r"^\s*Value:\s+0x([0-9a-f]+) 0x([0-9a-f]+) 0x([0-9a-f]+)")


def _sass_opcodes(sass: str) -> Dict[Tuple[str, str], collections.Counter]:
    """(arch, symbol) -> opcode counts, from ``cuobjdump -sass``. Predicates (@P0) are dropped."""
    result: Dict[Tuple[str, str], collections.Counter] = {}
    arch, current = None, None
    for line in sass.splitlines():
        if m := _ARCH.match(line):
            arch, current = m.group(1), None
        elif m := _SASS_FUNCTION.match(line):
            current = result.setdefault((arch, m.group(1)), collections.Counter())
        elif current is not None and (m := _SASS_INSTRUCTION.match(line)):
            current[m.group(1)] += 1
    return result


def _resource_usage(res: str) -> Dict[Tuple[str, str], Tuple[int, int, int]]:
    """(arch, symbol) -> (registers, stack bytes, local bytes), from ``cuobjdump -res-usage``."""
    result = {}
    arch, symbol = None, None
    for line in res.splitlines():
        if m := _ARCH.match(line):
            arch = m.group(1)
        elif m := _RES_FUNCTION.match(line):
            symbol = m.group(1)
        elif symbol is not None and (m := _RES_USAGE.search(line)):
            result[(arch, symbol)] = tuple(int(g) for g in m.groups())
            symbol = None
    return result


def _max_threads(elf: str) -> Dict[Tuple[str, str], int]:
    """(arch, symbol) -> threads per block of the launch bounds (EIATTR_MAX_THREADS x * y * z)."""
    result = {}
    arch, symbol, attribute = None, None, None
    for line in elf.splitlines():
        if m := _ARCH.match(line):
            arch, symbol = m.group(1), None
        elif m := _INFO_SECTION.match(line):
            symbol, attribute = m.group(1), None
        elif line.startswith(".") or line.startswith("Fatbin"):
            symbol = None
        elif symbol is not None and "Attribute:" in line:
            attribute = line.split()[-1]
        elif symbol is not None and attribute == "EIATTR_MAX_THREADS" and (m := _MAX_THREADS_VALUE.match(line)):
            x, y, z = (int(g, 16) for g in m.groups())
            result[(arch, symbol)] = x * y * z
    return result


def read_kernels(binary: str, symbol_prefix: str = "") -> List[Kernel]:
    """Every kernel of every architecture in ``binary`` (a .so with device code, or a .fatbin) whose
    symbol starts with ``symbol_prefix``. Raises FileNotFoundError when no cuobjdump is found."""
    tool = find_tool("cuobjdump")
    if tool is None:
        raise FileNotFoundError("no cuobjdump (CUDA toolkit, PATH, or the triton wheel's copy)")
    opcodes = _sass_opcodes(_run([tool, "-sass", binary]))
    usage = _resource_usage(_run([tool, "-res-usage", binary]))
    threads = _max_threads(_run([tool, "-elf", binary]))
    keys = sorted(k for k in opcodes if k[1].startswith(symbol_prefix))
    names = _demangle(sorted({symbol for _, symbol in keys}))
    kernels = []
    for arch, symbol in keys:
        registers, stack, local = usage.get((arch, symbol), (-1, 0, 0))
        kernels.append(Kernel(arch=arch, mangled=symbol, name=names[symbol], registers=registers, stack=stack,
                              local=local, max_threads=threads.get((arch, symbol)),
                              opcodes=opcodes[(arch, symbol)]))
    return kernels


def _matching_open(text: str, close_at: int, open_ch: str, close_ch: str) -> int:
    """Index of the bracket that opens the one closing at ``close_at`` (scanning backwards)."""
    depth = 0
    for i in range(close_at, -1, -1):
        depth += text[i] == close_ch
        depth -= text[i] == open_ch
        if depth == 0:
            return i
    return -1


def _qualified_head(kernel: Kernel) -> str:
    """The demangled name without return type and parameter list: "m6::(anonymous namespace)::k<T, 8>"."""
    name = kernel.name.strip()
    if name.endswith(")"):  # the parameter list (the namespace "(anonymous namespace)" has parentheses too)
        name = name[:_matching_open(name, len(name) - 1, "(", ")")]
    return name[len("void "):] if name.startswith("void ") else name


def kernel_family(kernel: Kernel) -> str:
    """The kernel's unqualified function name without template arguments: "softmax_fwd_regs"."""
    head = _qualified_head(kernel)
    if head.endswith(">"):
        head = head[:_matching_open(head, len(head) - 1, "<", ">")]
    return head.rsplit("::", 1)[-1]


def template_arguments(kernel: Kernel) -> List[str]:
    """The top-level template arguments of a demangled kernel name: ["c10::BFloat16", "8", "4"]."""
    head = _qualified_head(kernel)
    if not head.endswith(">"):
        return []
    inner = head[_matching_open(head, len(head) - 1, "<", ">") + 1:-1]
    args, depth, current = [], 0, ""
    for ch in inner:
        if ch == "," and depth == 0:
            args.append(current.strip())
            current = ""
            continue
        depth += ch in "<("
        depth -= ch in ">)"
        current += ch
    return args + [current.strip()]
