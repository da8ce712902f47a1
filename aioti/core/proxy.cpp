// aioti's proxy executor object: what a model library calls, through libtorch's
// aoti_torch_proxy_executor_call_function, for operators that have no C shim (custom operators,
// some of torch's own). The library holds it as a torch::aot_inductor::ProxyExecutor* and makes
// one virtual call, call_function; this class has the same virtual table up to that slot
// (destructor, call_function), so it needs no torch header. The work is done in Python
// (aioti.core.proxy) through `fn`; a failure comes back as a message and is thrown here as a
// C++ exception, which libtorch turns into the run's error code.

#include <cstddef>
#include <cstdint>
#include <stdexcept>

extern "C" {
// Returns 0, or non-zero with a message written into `error` (at most `error_size` bytes).
typedef int (*aioti_extern_fn)(int node, int num_ints, int64_t *ints, int num_tensors,
                               void **tensors, char *error, size_t error_size);
}

namespace {

class Proxy {
 public:
  explicit Proxy(aioti_extern_fn fn) : fn_(fn) {}
  virtual ~Proxy() = default;
  virtual void call_function(int node, int num_ints, int64_t *ints, int num_tensors,
                             void **tensors) {
    char error[4096] = {0};
    if (fn_(node, num_ints, ints, num_tensors, tensors, error, sizeof error - 1) != 0) {
      throw std::runtime_error(error[0] ? error : "aioti proxy executor: operator failed");
    }
  }

 private:
  aioti_extern_fn fn_;
};

}  // namespace

extern "C" void *aioti_proxy_new(aioti_extern_fn fn) { return new Proxy(fn); }

extern "C" void aioti_proxy_delete(void *proxy) { delete static_cast<Proxy *>(proxy); }
