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

typedef int (*aioti_copy_fn)(unsigned long long dst, unsigned long long src, size_t nbytes,
                             void *stream);
typedef int (*aioti_launch_fn)(void *graph_exec, void *stream);

/* Replays of captured CUDA graphs (aioti.runtime.graphs), queued on `stream` in one call:
 * ops[3*i], ops[3*i+1], ops[3*i+2] is (dst, src, nbytes) for a device-to-device copy, or
 * (graph_exec, 0, (size_t)-1) for a graph launch. `copy` and `launch` are the driver's
 * cuMemcpyDtoDAsync_v2 and cuGraphLaunch. Stops at the first failure: returns its code and
 * sets *done to the number of ops queued before it. */
int aioti_replay_many(aioti_copy_fn copy, aioti_launch_fn launch, const unsigned long long *ops,
                      size_t count, void *stream, size_t *done)
{
    for (size_t i = 0; i < count; i++) {
        const unsigned long long *op = ops + 3 * i;
        int code = op[2] == (unsigned long long)-1
                       ? launch((void *)(size_t)op[0], stream)
                       : (op[2] ? copy(op[0], op[1], (size_t)op[2], stream) : 0);
        if (code != 0) {
            *done = i;
            return code;
        }
    }
    *done = count;
    return 0;
}
