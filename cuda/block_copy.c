/* mpkv_copy_runs: copying runs of consecutive blocks between two pools, one 2D copy per run.
 *
 * A pool is [planes, blocks, block_bytes] bytes (planes = layers * 2, K and V), so run (dst_block, src_block, count)
 * is the same count * block_bytes bytes in every plane: a 2D copy of `planes` rows whose pitches are the two pools'
 * plane strides. Memory types are UNIFIED: torch's pinned host memory is UVA-addressable, so one path serves
 * host<->device and device<->device.
 *
 * cuMemcpy2DAsync refuses a pitch above CU_DEVICE_ATTRIBUTE_MAX_PITCH (cuda.h, cuMemcpy2DAsync: "returns an error if
 * any pitch is greater than the maximum allowed"); on current GPUs that is 2^31 - 1 bytes, which a large pool's plane
 * exceeds. cuda.h also warns that device-to-device 2D copies "may fail for pitches not computed by cuMemAllocPitch".
 * Both failures are argument checks returned when the copy is enqueued, before anything runs, so such a run is issued
 * instead as one cuMemcpyAsync per plane (the same bytes, more calls); a real bad pointer then fails there too. */
#define _POSIX_C_SOURCE 200809L

#include "driver.h"

#include <stddef.h>
#include <stdint.h>

_Static_assert(sizeof(size_t) == 8 && sizeof(CUdeviceptr) == 8, "mpkv_copy_runs assumes a 64-bit platform");

/* 0 when a + b * c does not overflow, with *out = a + b * c. */
static int affine(uint64_t a, uint64_t b, uint64_t c, uint64_t *out) {
    uint64_t bc;
    return __builtin_mul_overflow(b, c, &bc) || __builtin_add_overflow(a, bc, out);
}

/* A run stays inside its plane in both pools, and both pools' last byte is addressable: then no offset computed
 * while issuing can overflow, and the 2D copy's pitch is at least its width. */
static int valid(uint64_t dst, uint64_t dst_stride, uint64_t src, uint64_t src_stride, uint64_t planes,
                 uint64_t block_bytes, const int64_t *runs, uint64_t nruns) {
    uint64_t end;
    if (dst == 0 || src == 0 || planes == 0 || block_bytes == 0 || (nruns > 0 && runs == NULL) ||
        nruns > UINT64_MAX / 3)
        return 0;
    if (affine(dst, planes, dst_stride, &end) || affine(src, planes, src_stride, &end))
        return 0;
    for (uint64_t i = 0; i < nruns; i++) {
        int64_t d = runs[3 * i], s = runs[3 * i + 1], n = runs[3 * i + 2];
        if (d < 0 || s < 0 || n <= 0)
            return 0;
        if (affine(0, (uint64_t)d + (uint64_t)n, block_bytes, &end) || end > dst_stride)
            return 0;
        if (affine(0, (uint64_t)s + (uint64_t)n, block_bytes, &end) || end > src_stride)
            return 0;
    }
    return 1;
}

static CUresult copy_planes(const struct mpkv_driver *drv, CUdeviceptr dst, uint64_t dst_stride, CUdeviceptr src,
                            uint64_t src_stride, uint64_t planes, size_t width, CUstream stream) {
    for (uint64_t p = 0; p < planes; p++) {
        CUresult rc = drv->cuMemcpyAsync(dst + p * dst_stride, src + p * src_stride, width, stream);
        if (rc != CUDA_SUCCESS)
            return rc;
    }
    return CUDA_SUCCESS;
}

static CUresult copy_2d(const struct mpkv_driver *drv, CUdeviceptr dst, uint64_t dst_stride, CUdeviceptr src,
                        uint64_t src_stride, uint64_t planes, size_t width, CUstream stream) {
    CUDA_MEMCPY2D c = {0};
    c.srcMemoryType = CU_MEMORYTYPE_UNIFIED;
    c.srcDevice = src;
    c.srcPitch = src_stride;
    c.dstMemoryType = CU_MEMORYTYPE_UNIFIED;
    c.dstDevice = dst;
    c.dstPitch = dst_stride;
    c.WidthInBytes = width;
    c.Height = planes;
    return drv->cuMemcpy2DAsync(&c, stream);
}

/* Whether both pitches are within the current device's limit (the copy runs in the current context). */
static CUresult pitches_fit(const struct mpkv_driver *drv, uint64_t dst_stride, uint64_t src_stride, int *fit) {
    CUdevice dev;
    int max_pitch = 0;
    CUresult rc = drv->cuCtxGetDevice(&dev);
    if (rc == CUDA_SUCCESS)
        rc = drv->cuDeviceGetAttribute(&max_pitch, CU_DEVICE_ATTRIBUTE_MAX_PITCH, dev);
    *fit = rc == CUDA_SUCCESS && max_pitch > 0 && dst_stride <= (uint64_t)max_pitch &&
           src_stride <= (uint64_t)max_pitch;
    return rc;
}

MPKV_EXPORT int mpkv_copy_runs(uint64_t dst, uint64_t dst_plane_stride, uint64_t src, uint64_t src_plane_stride,
                               uint64_t planes, uint64_t block_bytes, const int64_t *runs, uint64_t nruns,
                               uint64_t stream) {
    const struct mpkv_driver *drv;
    int use_2d = 0;
    if (!valid(dst, dst_plane_stride, src, src_plane_stride, planes, block_bytes, runs, nruns))
        return MPKV_EINVAL;
    if (nruns == 0)
        return 0;
    int rc = mpkv_driver(&drv);
    if (rc != 0)
        return rc;
    if (planes > 1 && (rc = (int)pitches_fit(drv, dst_plane_stride, src_plane_stride, &use_2d)) != 0)
        return rc;
    CUstream s = (CUstream)(uintptr_t)stream;
    /* Runs already enqueued stay enqueued when a later one fails: the caller treats any error as fatal for the
     * destination blocks of the whole call. */
    for (uint64_t i = 0; i < nruns; i++) {
        CUdeviceptr d = dst + (uint64_t)runs[3 * i] * block_bytes;
        CUdeviceptr from = src + (uint64_t)runs[3 * i + 1] * block_bytes;
        size_t width = (size_t)runs[3 * i + 2] * block_bytes;
        CUresult r = CUDA_ERROR_INVALID_VALUE;
        if (use_2d) {
            r = copy_2d(drv, d, dst_plane_stride, from, src_plane_stride, planes, width, s);
            /* Refused as an argument: the 2D path is not for these pitches; the rest go plane by plane. */
            use_2d = r != CUDA_ERROR_INVALID_VALUE;
        }
        if (!use_2d)
            r = copy_planes(drv, d, dst_plane_stride, from, src_plane_stride, planes, width, s);
        if (r != CUDA_SUCCESS)
            return (int)r;
    }
    return 0;
}
