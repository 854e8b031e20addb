/* A pool at a stable address with CUDA virtual memory management: reserve a virtual range, back it with physical
 * memory created here (exported as a POSIX file descriptor) or imported from another process's descriptor, and give
 * the device read-write access. Every function that takes several steps undoes the completed ones when a later one
 * fails, so an error leaves nothing behind. */
#define _POSIX_C_SOURCE 200809L

#include "driver.h"

#include <stdint.h>
#include <string.h>

/* The one kind of allocation mpkv makes: pinned device memory that can be exported as a file descriptor. The
 * granularity query and cuMemCreate use the same properties, so sizes rounded to it are valid for cuMemMap. */
static CUmemAllocationProp device_memory(int device) {
    CUmemAllocationProp p;
    memset(&p, 0, sizeof p);
    p.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    p.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    p.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    p.location.id = device;
    return p;
}

static CUresult grant_access(const struct mpkv_driver *drv, int device, uint64_t va, uint64_t size) {
    CUmemAccessDesc a;
    memset(&a, 0, sizeof a);
    a.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    a.location.id = device;
    a.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    return drv->cuMemSetAccess((CUdeviceptr)va, size, &a, 1);
}

/* cuMemMap then cuMemSetAccess; on failure of the second, the mapping is undone. */
static CUresult map_rw(const struct mpkv_driver *drv, int device, uint64_t va, uint64_t size,
                       CUmemGenericAllocationHandle h) {
    CUresult rc = drv->cuMemMap((CUdeviceptr)va, size, 0, h, 0);
    if (rc != CUDA_SUCCESS)
        return rc;
    rc = grant_access(drv, device, va, size);
    if (rc != CUDA_SUCCESS)
        drv->cuMemUnmap((CUdeviceptr)va, size);
    return rc;
}

MPKV_EXPORT int mpkv_vmm_granularity(int device, uint64_t *out) {
    const struct mpkv_driver *drv;
    if (device < 0 || out == NULL)
        return MPKV_EINVAL;
    *out = 0;
    int rc = mpkv_driver(&drv);
    if (rc != 0)
        return rc;
    CUmemAllocationProp p = device_memory(device);
    size_t g = 0;
    rc = (int)drv->cuMemGetAllocationGranularity(&g, &p, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED);
    if (rc == 0)
        *out = g;
    return rc;
}

MPKV_EXPORT int mpkv_vmm_reserve(uint64_t size, uint64_t *va_out) {
    const struct mpkv_driver *drv;
    if (size == 0 || va_out == NULL)
        return MPKV_EINVAL;
    *va_out = 0;
    int rc = mpkv_driver(&drv);
    if (rc != 0)
        return rc;
    CUdeviceptr va = 0;
    rc = (int)drv->cuMemAddressReserve(&va, size, 0, 0, 0);
    if (rc == 0)
        *va_out = va;
    return rc;
}

MPKV_EXPORT int mpkv_vmm_unreserve(uint64_t va, uint64_t size) {
    const struct mpkv_driver *drv;
    if (va == 0 || size == 0)
        return MPKV_EINVAL;
    int rc = mpkv_driver(&drv);
    return rc != 0 ? rc : (int)drv->cuMemAddressFree((CUdeviceptr)va, size);
}

MPKV_EXPORT int mpkv_vmm_create_and_map(int device, uint64_t va, uint64_t size, uint64_t *handle_out, int *fd_out) {
    const struct mpkv_driver *drv;
    if (device < 0 || va == 0 || size == 0 || handle_out == NULL || fd_out == NULL)
        return MPKV_EINVAL;
    *handle_out = 0;
    *fd_out = -1;
    int rc = mpkv_driver(&drv);
    if (rc != 0)
        return rc;
    CUmemAllocationProp p = device_memory(device);
    CUmemGenericAllocationHandle h = 0;
    CUresult r = drv->cuMemCreate(&h, size, &p, 0);
    if (r != CUDA_SUCCESS)
        return (int)r;
    r = map_rw(drv, device, va, size, h);
    if (r != CUDA_SUCCESS) {
        drv->cuMemRelease(h);
        return (int)r;
    }
    /* Exported last: no step after it can fail, so an error never leaves an open descriptor behind. */
    int fd = -1;
    r = drv->cuMemExportToShareableHandle(&fd, h, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0);
    if (r != CUDA_SUCCESS) {
        drv->cuMemUnmap((CUdeviceptr)va, size);
        drv->cuMemRelease(h);
        return (int)r;
    }
    *handle_out = h;
    *fd_out = fd;
    return 0;
}

MPKV_EXPORT int mpkv_vmm_import_and_map(int device, int fd, uint64_t va, uint64_t size, uint64_t *handle_out) {
    const struct mpkv_driver *drv;
    if (device < 0 || fd < 0 || va == 0 || size == 0 || handle_out == NULL)
        return MPKV_EINVAL;
    *handle_out = 0;
    int rc = mpkv_driver(&drv);
    if (rc != 0)
        return rc;
    CUmemGenericAllocationHandle h = 0;
    CUresult r = drv->cuMemImportFromShareableHandle(&h, (void *)(intptr_t)fd, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR);
    if (r != CUDA_SUCCESS)
        return (int)r;
    r = map_rw(drv, device, va, size, h);
    if (r != CUDA_SUCCESS) {
        drv->cuMemRelease(h);
        return (int)r;
    }
    *handle_out = h;
    return 0;
}

MPKV_EXPORT int mpkv_vmm_unmap_and_release(uint64_t va, uint64_t size, uint64_t handle) {
    const struct mpkv_driver *drv;
    if (va == 0 || size == 0 || handle == 0)
        return MPKV_EINVAL;
    int rc = mpkv_driver(&drv);
    if (rc != 0)
        return rc;
    /* A failed unmap (wrong range) keeps the handle, so the caller can retry with the right range. */
    rc = (int)drv->cuMemUnmap((CUdeviceptr)va, size);
    return rc != 0 ? rc : (int)drv->cuMemRelease(handle);
}
