#!/usr/bin/env python3
# Regenerates src/container/seccomp_default.json from containerd's
# contrib/seccomp/seccomp_default.go:
#   hack/gen-seccomp-default.py seccomp_default.go > src/container/seccomp_default.json
# The output is checked in; berth reads only the JSON.
import json, re, sys
src = open(sys.argv[1]).read()
lines = src.splitlines()
# 1. the big allow list: from the first `Names: []string{` to its closing.
start = next(i for i, l in enumerate(lines) if 'Names: []string{' in l)
names = []
for l in lines[start + 1:]:
    if l.strip().startswith('},'):
        break
    m = re.match(r'\s*"([a-z0-9_]+)",', l)
    if m:
        names.append(m.group(1))
AF_ALG, AF_VSOCK = 38, 40
syscalls = [{"names": names, "action": "SCMP_ACT_ALLOW"}]
def arg(index, value, op, two=None):
    a = {"index": index, "value": value, "op": op}
    if two is not None:
        a["valueTwo"] = two
    return a
syscalls += [
    {"names": ["socket"], "action": "SCMP_ACT_ALLOW", "args": [arg(0, AF_ALG, "SCMP_CMP_LT")]},
    {"names": ["socket"], "action": "SCMP_ACT_ALLOW", "args": [arg(0, AF_ALG + 1, "SCMP_CMP_EQ")]},
    {"names": ["socket"], "action": "SCMP_ACT_ALLOW", "args": [arg(0, AF_VSOCK, "SCMP_CMP_GT")]},
]
for v in [0x0, 0x0008, 0x20000, 0x20008, 0xffffffff]:
    syscalls.append({"names": ["personality"], "action": "SCMP_ACT_ALLOW", "args": [arg(0, v, "SCMP_CMP_EQ")]})
syscalls.append({"names": ["process_vm_readv", "process_vm_writev", "ptrace"], "action": "SCMP_ACT_ALLOW",
                 "includes": {"minKernel": "4.8"}})
def block(after):
    """Names of the first `Names: []string{` block after `after`."""
    i = src.index(after)
    j = src.index('Names:', i)
    k = src.index('}', j)
    body = src[j:k]
    return re.findall(r'"([a-z0-9_]+)"', body)
for arches, marker in [(["ppc64le"], 'case "ppc64le":'), (["arm", "arm64"], 'case "arm", "arm64":'),
                       (["amd64"], 'case "amd64":\n\t\ts.Syscalls'), (["386"], 'case "386":'),
                       (["s390", "s390x"], 'case "s390", "s390x":\n\t\ts.Syscalls'), (["riscv64"], 'case "riscv64":\n\t\ts.Syscalls')]:
    syscalls.append({"names": block(marker), "action": "SCMP_ACT_ALLOW", "includes": {"arches": arches}})
caps_part = src[src.index('for _, c := range sp.Process.Capabilities.Bounding'):src.index('if !admin {')]
for m in re.finditer(r'case "(CAP_[A-Z_]+)":(.*?)(?=case "CAP_|\Z)', caps_part, re.S):
    cap, body = m.group(1), m.group(2)
    j = body.index('Names:'); k = body.index('}', j)
    syscalls.append({"names": re.findall(r'"([a-z0-9_]+)"', body[j:k]), "action": "SCMP_ACT_ALLOW",
                     "includes": {"caps": [cap]}})
NS = 0x00020000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x02000000
syscalls.append({"names": ["clone"], "action": "SCMP_ACT_ALLOW", "args": [arg(1, NS, "SCMP_CMP_MASKED_EQ", 0)],
                 "includes": {"arches": ["s390", "s390x"]}, "excludes": {"caps": ["CAP_SYS_ADMIN"]}})
syscalls.append({"names": ["clone"], "action": "SCMP_ACT_ALLOW", "args": [arg(0, NS, "SCMP_CMP_MASKED_EQ", 0)],
                 "excludes": {"caps": ["CAP_SYS_ADMIN"], "arches": ["s390", "s390x"]}})
syscalls.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38,
                 "excludes": {"caps": ["CAP_SYS_ADMIN"]}})
profile = {
    "comment": "containerd's default seccomp profile (contrib/seccomp/seccomp_default.go at 0c23e946a784ebd48cc53d5df9d16ec8199747a1) as data, in Docker's profile format: includes/excludes select rules by capability, architecture and kernel version.",
    "defaultAction": "SCMP_ACT_ERRNO",
    "archMap": [
        {"arch": "amd64", "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
        {"arch": "arm64", "architectures": ["SCMP_ARCH_ARM", "SCMP_ARCH_AARCH64"]},
        {"arch": "mips64", "architectures": ["SCMP_ARCH_MIPS", "SCMP_ARCH_MIPS64", "SCMP_ARCH_MIPS64N32"]},
        {"arch": "mips64n32", "architectures": ["SCMP_ARCH_MIPS", "SCMP_ARCH_MIPS64", "SCMP_ARCH_MIPS64N32"]},
        {"arch": "mipsel64", "architectures": ["SCMP_ARCH_MIPSEL", "SCMP_ARCH_MIPSEL64", "SCMP_ARCH_MIPSEL64N32"]},
        {"arch": "mipsel64n32", "architectures": ["SCMP_ARCH_MIPSEL", "SCMP_ARCH_MIPSEL64", "SCMP_ARCH_MIPSEL64N32"]},
        {"arch": "s390x", "architectures": ["SCMP_ARCH_S390", "SCMP_ARCH_S390X"]},
        {"arch": "riscv64", "architectures": ["SCMP_ARCH_RISCV64"]},
        {"arch": "loong64", "architectures": ["SCMP_ARCH_LOONGARCH64"]},
    ],
    "syscalls": syscalls,
}
json.dump(profile, sys.stdout, indent=1)
print()
