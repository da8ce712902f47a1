/* aioti's native run loops: run a model `count` times in one call, or queue a chunk's CUDA graph
 * replays in one call, so that a worker thread releases and re-takes the GIL once per batch of
 * runs instead of once per run.
 *
 * Plain C (only the compiler's own <stddef.h>): the model library's Run function is passed in
 * as a pointer, and every handle is opaque. Built on first use by aioti.core.runmany and loaded
 * with ctypes, which releases the GIL for the duration of the call. */

#include <stddef.h>

typedef int (*aioti_run_fn)(void *container, void **inputs, size_t num_inputs, void **outputs,
                            size_t num_outputs, void *stream, void *proxy_executor);

/* Runs i = 0 .. count-1 on inputs[i*num_inputs ...] and outputs[i*num_outputs ...], in order,
 * stopping at the first that fails: returns its code (0 if none failed) and sets *done to the
 * number of runs that completed before it. Run takes over each run's input handles, the
 * failed one's included; the runs after a failed one are not started. `proxy_executor` (may
 * be null) is what the model calls for operators without a C shim (aioti.core.proxy). */
int aioti_run_many(aioti_run_fn run, void *container, void **inputs, size_t num_inputs,
                   void **outputs, size_t num_outputs, size_t count, void *stream,
                   void *proxy_executor, size_t *done)
{
    for (size_t i = 0; i < count; i++) {
        int code = run(container, inputs + i * num_inputs, num_inputs,
                       outputs + i * num_outputs, num_outputs, stream, proxy_executor);
        if (code != 0) {
            *done = i;
            return code;
        }
    }
    *done = count;
    return 0;
}

typedef int (*aioti_launch_fn)(void *graph_exec, void *stream);

/* The driver's CUDA_MEMCPY3D (cuda.h), for a 1-D device-to-device copy. */
typedef struct {
    size_t srcXInBytes, srcY, srcZ, srcLOD;
    unsigned int srcMemoryType;
    const void *srcHost;
    unsigned long long srcDevice;
    void *srcArray, *reserved0;
    size_t srcPitch, srcHeight;
    size_t dstXInBytes, dstY, dstZ, dstLOD;
    unsigned int dstMemoryType;
    void *dstHost;
    unsigned long long dstDevice;
    void *dstArray, *reserved1;
    size_t dstPitch, dstHeight;
    size_t WidthInBytes, Height, Depth;
} aioti_memcpy3d;

typedef int (*aioti_set_copy_fn)(void *graph_exec, void *node, const aioti_memcpy3d *params,
                                 void *context);

/* Replays of captured CUDA graphs whose copies in and out are nodes of the graph
 * (aioti.runtime.graphs), queued on `stream` in one call. ops[5*i .. 5*i+4] is
 * (graph_exec, node, dst, src, nbytes): the copy node `node` of `graph_exec` set to copy
 * `nbytes` from device address `src` to `dst` at its next launches, or, with node 0,
 * (graph_exec, 0, 0, 0, 0): a launch of `graph_exec`. `set_copy` and `launch` are the driver's
 * cuGraphExecMemcpyNodeSetParams and cuGraphLaunch; `context` the device's context. Stops at
 * the first failure: returns its code and sets *done to the number of ops done before it. */
int aioti_replay_many(aioti_set_copy_fn set_copy, aioti_launch_fn launch, void *context,
                      const unsigned long long *ops, size_t count, void *stream, size_t *done)
{
    aioti_memcpy3d p = {0};
    p.srcMemoryType = p.dstMemoryType = 2; /* CU_MEMORYTYPE_DEVICE */
    p.Height = p.Depth = 1;
    for (size_t i = 0; i < count; i++) {
        const unsigned long long *op = ops + 5 * i;
        int code;
        if (op[1] == 0) {
            code = launch((void *)(size_t)op[0], stream);
        } else {
            p.dstDevice = op[2];
            p.srcDevice = op[3];
            p.WidthInBytes = (size_t)op[4];
            code = set_copy((void *)(size_t)op[0], (void *)(size_t)op[1], &p, context);
        }
        if (code != 0) {
            *done = i;
            return code;
        }
    }
    *done = count;
    return 0;
}
