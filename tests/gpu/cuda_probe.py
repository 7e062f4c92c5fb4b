"""What a berth worker sees of the GPUs: run inside workers by tests/gpu/h100-check.sh.

    python3 cuda_probe.py probe           environment, /dev/nvidia* opens, CUDA devices
    python3 cuda_probe.py load SECONDS    hold 1 GiB and keep the first visible GPU busy

Only the standard library and the driver's libcuda.so.1 (ctypes); no toolkit, no nvcc: the load
kernel is PTX that the driver compiles. Prints `key=value` lines; exit 0 unless CUDA failed in
`load`.
"""

import ctypes
import errno
import glob
import os
import sys
import time

# A busy loop every thread runs `iters` times, then stores its result so the loop stays.
PTX = b"""
.version 7.0
.target sm_75
.address_size 64

.visible .entry spin(.param .u64 p_out, .param .u32 p_iters)
{
    .reg .pred %p;
    .reg .b32 %r<6>;
    .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [p_out];
    ld.param.u32 %r1, [p_iters];
    mov.u32 %r2, %tid.x;
    mov.u32 %r3, 0;
LOOP:
    mad.lo.u32 %r2, %r2, 1664525, 1013904223;
    add.u32 %r3, %r3, 1;
    setp.lt.u32 %p, %r3, %r1;
    @%p bra LOOP;
    cvta.to.global.u64 %rd2, %rd1;
    mov.u32 %r4, %tid.x;
    mul.wide.u32 %rd3, %r4, 4;
    add.u64 %rd2, %rd2, %rd3;
    st.global.u32 [%rd2], %r2;
    ret;
}
\x00"""


def load_cuda():
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        print("cuda=unavailable reason=%r" % str(e))
        return None


def err_name(cuda, r):
    name = ctypes.c_char_p()
    cuda.cuGetErrorName(r, ctypes.byref(name))
    return (name.value or b"?").decode()


class CudaError(Exception):
    pass


def check(cuda, r, what):
    if r != 0:
        raise CudaError("cuda_error=%s call=%s code=%d" % (err_name(cuda, r), what, r))


def uuid_of(cuda, dev):
    buf = (ctypes.c_ubyte * 16)()
    if cuda.cuDeviceGetUuid(buf, dev) != 0:
        return "?"
    h = bytes(buf).hex()
    return "GPU-%s-%s-%s-%s-%s" % (h[0:8], h[8:12], h[12:16], h[16:20], h[20:32])


def probe():
    for k in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"):
        print("env_%s=%s" % (k, os.environ.get(k, "<unset>")))
    nodes = sorted(glob.glob("/dev/nvidia[0-9]*")) + ["/dev/nvidiactl"]
    for n in nodes:
        try:
            os.close(os.open(n, os.O_RDWR))
            r = "OK"
        except OSError as e:
            r = errno.errorcode.get(e.errno, str(e.errno))
        print("open %s %s" % (n, r))
    cuda = load_cuda()
    if cuda is None:
        return
    r = cuda.cuInit(0)
    if r != 0:
        print("cuda_init=%s cuda_devices=0" % err_name(cuda, r))
        return
    n = ctypes.c_int()
    check(cuda, cuda.cuDeviceGetCount(ctypes.byref(n)), "cuDeviceGetCount")
    print("cuda_init=CUDA_SUCCESS cuda_devices=%d" % n.value)
    for i in range(n.value):
        dev = ctypes.c_int()
        check(cuda, cuda.cuDeviceGet(ctypes.byref(dev), i), "cuDeviceGet")
        name = ctypes.create_string_buffer(256)
        cuda.cuDeviceGetName(name, 256, dev)
        print("cuda_device=%d uuid=%s name=%r" % (i, uuid_of(cuda, dev), name.value.decode()))


def load(seconds):
    cuda = load_cuda()
    if cuda is None:
        sys.exit(1)
    try:
        load_ptx(cuda, seconds)
        return
    except CudaError as e:
        print("ptx_load_failed %s" % e)
        sys.stdout.flush()
    # The driver would not take the PTX: PyTorch, where this python has it, loads the GPU too.
    try:
        import torch
    except ImportError:
        print("torch=unavailable")
        sys.exit(1)
    x = torch.ones(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    a = torch.randn(8192, 8192, device="cuda")
    b = torch.randn(8192, 8192, device="cuda")
    print("load_start torch bytes=%d seconds=%s" % (x.numel() * 4, seconds))
    sys.stdout.flush()
    end = time.time() + seconds
    n = 0
    while time.time() < end:
        for _ in range(10):
            a = (a @ b) / 8192.0
            n += 1
        torch.cuda.synchronize()
    print("load_done matmuls=%d" % n)


def load_ptx(cuda, seconds):
    check(cuda, cuda.cuInit(0), "cuInit")
    dev = ctypes.c_int()
    check(cuda, cuda.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
    ctx = ctypes.c_void_p()
    check(cuda, cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    check(cuda, cuda.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    size = 1 << 30
    ptr = ctypes.c_uint64()
    check(cuda, cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(size)), "cuMemAlloc")
    check(cuda, cuda.cuMemsetD8_v2(ptr, ctypes.c_ubyte(1), ctypes.c_size_t(size)), "cuMemsetD8")
    mod = ctypes.c_void_p()
    check(cuda, cuda.cuModuleLoadData(ctypes.byref(mod), ctypes.c_char_p(PTX)), "cuModuleLoadData")
    fn = ctypes.c_void_p()
    check(cuda, cuda.cuModuleGetFunction(ctypes.byref(fn), mod, b"spin"), "cuModuleGetFunction")
    out = ctypes.c_uint64(ptr.value)
    iters = ctypes.c_uint32(200000)
    params = (ctypes.c_void_p * 2)(
        ctypes.cast(ctypes.byref(out), ctypes.c_void_p),
        ctypes.cast(ctypes.byref(iters), ctypes.c_void_p),
    )
    print("load_start uuid=%s bytes=%d seconds=%s" % (uuid_of(cuda, dev), size, seconds))
    sys.stdout.flush()
    end = time.time() + seconds
    launches = 0
    while time.time() < end:
        for _ in range(8):
            check(cuda, cuda.cuLaunchKernel(fn, 2048, 1, 1, 256, 1, 1, 0, None, params, None),
                  "cuLaunchKernel")
            launches += 1
        check(cuda, cuda.cuCtxSynchronize(), "cuCtxSynchronize")
    print("load_done launches=%d" % launches)


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "probe"
    if mode == "probe":
        try:
            probe()
        except CudaError as e:
            print(e)
    elif mode == "load":
        load(float(sys.argv[2]) if len(sys.argv) > 2 else 20.0)
    else:
        print("usage: cuda_probe.py probe | load SECONDS", file=sys.stderr)
        sys.exit(2)
