// Native call interception for tapml.recorder: a boxed fallback on the (otherwise unused) Fake dispatch key,
// which sits directly below Python, so it sees exactly the calls a Python TorchDispatchMode sees. Each call is
// counted in C++; a call whose exact key (op, tensor dtypes/shapes/strides/offsets, scalar values) is already
// known to need no sample is simply redispatched. Others call the Recorder's Python hooks: `before` answers None
// (never again: the key becomes count-only), False (not this call: ask again next time) or a pending sample that
// `after` completes once the op has run.
// The Recorder keeps references (not copies) to the tensors it records until they are written to disk; it
// watches their storages here, and an op about to write into a watched storage first calls `on_write`.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/utils/tensor_memoryformats.h>
#include <torch/csrc/PyInterpreter.h>
#include <torch/extension.h>

#include <cstring>
#include <mutex>
#include <unordered_map>
#include <unordered_set>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

using Key = std::vector<int64_t>;

struct KeyHash {
  size_t operator()(const Key& k) const noexcept {
    uint64_t h = 1469598103934665603ull;
    for (int64_t v : k) {
      h ^= static_cast<uint64_t>(v) + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    }
    return static_cast<size_t>(h);
  }
};

struct Slot {
  int64_t count = 0;
  bool count_only = false;
};

struct State {
  std::mutex mu;  // the key table and counters; never held while Python or a kernel runs
  bool active = false;
  int64_t calls = 0;
  std::unordered_map<Key, int64_t, KeyHash> keys;
  std::vector<Slot> slots;
  bool trace = false;
  std::vector<const c10::OperatorHandle*> traced;
  py::object before, after, on_write;
  std::unordered_set<int64_t> watched;  // storage data pointers the Recorder references or caches hashes of
};

State* g_state = nullptr;

// Appends the key tokens of one IValue; false when the value is of a kind the key does not cover.
bool add_ivalue(Key& k, const c10::IValue& v) {
  if (v.isTensor()) {
    const auto& t = v.toTensor();
    if (!t.defined()) { k.push_back(1); return true; }
    if (t.is_sparse() || t.layout() != c10::kStrided) return false;
    if (t.unsafeGetTensorImpl()->is_wrapped_number()) {  // a Python number: its value is part of the key
      if (!t.is_cpu() || t.element_size() > 16) return false;
      int64_t bits[2] = {0, 0};
      std::memcpy(bits, t.const_data_ptr(), t.element_size());
      k.push_back(11);
      k.push_back(static_cast<int64_t>(t.scalar_type()));
      k.push_back(bits[0]);
      k.push_back(bits[1]);
      return true;
    }
    k.push_back(2);
    k.push_back(static_cast<int64_t>(t.scalar_type()));
    k.push_back(static_cast<int64_t>(t.device().type()) * 1000 + t.device().index());
    k.push_back(t.dim());
    for (auto s : t.sizes()) k.push_back(s);
    for (auto s : t.strides()) k.push_back(s);
    k.push_back(t.storage_offset());
    k.push_back(t.requires_grad());
    return true;
  }
  if (v.isNone()) { k.push_back(3); return true; }
  if (v.isInt()) { k.push_back(4); k.push_back(v.toInt()); return true; }
  if (v.isDouble()) {
    double d = v.toDouble();
    int64_t bits;
    std::memcpy(&bits, &d, sizeof bits);
    k.push_back(5); k.push_back(bits); return true;
  }
  if (v.isBool()) { k.push_back(6); k.push_back(v.toBool()); return true; }
  if (v.isString()) {
    const auto& s = v.toStringRef();
    k.push_back(7); k.push_back(static_cast<int64_t>(s.size()));
    for (char c : s) k.push_back(c);
    return true;
  }
  if (v.isDevice()) {
    k.push_back(8); k.push_back(static_cast<int64_t>(v.toDevice().type()) * 1000 + v.toDevice().index());
    return true;
  }
  if (v.isIntList()) {
    k.push_back(9);
    auto l = v.toIntList();
    k.push_back(static_cast<int64_t>(l.size()));
    for (int64_t x : l) k.push_back(x);
    return true;
  }
  if (v.isList()) {  // tensor lists, optional tensor lists, double/bool lists
    k.push_back(10);
    auto l = v.toListRef();
    k.push_back(static_cast<int64_t>(l.size()));
    for (const auto& x : l) {
      if (!add_ivalue(k, x)) return false;
    }
    return true;
  }
  return false;
}

void slow_path(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack, int64_t index,
               int64_t slot, bool is_new);
void guard_writes(const c10::OperatorHandle& op, torch::jit::Stack* stack);

// Keeps the pushed pass-through mode's Python key off: some calls (a mode push/pop in Python code, kernels
// that snapshot TLS) switch it back on, which would send every later op through Python again.
inline void python_key_off() {
  if (c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::Python)) {
    c10::impl::tls_set_dispatch_key_included(c10::DispatchKey::Python, false);
    c10::impl::tls_set_dispatch_key_included(c10::DispatchKey::PythonTLSSnapshot, false);
  }
}

void redispatch(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  {
    c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::Fake);
    op.redispatchBoxed(ks & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, c10::DispatchKey::Fake), stack);
  }
  python_key_off();
}

void fallback(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  State* st = g_state;
  if (st == nullptr || !st->active) {
    redispatch(op, ks, stack);
    return;
  }
  const auto n = op.schema().arguments().size();
  Key key;
  key.reserve(48);
  key.push_back(reinterpret_cast<int64_t>(&op.schema()));
  bool ok = true;
  for (size_t i = stack->size() - n; i < stack->size(); ++i) {
    if (!add_ivalue(key, (*stack)[i])) { ok = false; break; }
  }
  int64_t slot = -1;
  bool is_new = false;
  bool count_only = false;
  int64_t index;
  {
    std::lock_guard<std::mutex> lock(st->mu);
    index = st->calls++;
    if (st->trace) st->traced.push_back(&op);
    if (ok) {
      auto it = st->keys.find(key);
      if (it == st->keys.end()) {
        slot = static_cast<int64_t>(st->slots.size());
        st->slots.emplace_back();
        st->keys.emplace(std::move(key), slot);
        is_new = true;
      } else {
        slot = it->second;
      }
      Slot& s = st->slots[slot];
      s.count += 1;
      count_only = s.count_only;
    }
  }
  if (!st->watched.empty() && op.schema().is_mutable()) guard_writes(op, stack);
  if (count_only) {
    redispatch(op, ks, stack);
    return;
  }
  slow_path(op, ks, stack, index, slot, is_new);
}

py::object arg_to_py(const c10::Argument& arg, const c10::IValue& v) {
  auto match = [&](c10::TypeKind kind) {
    const auto& t = arg.real_type();
    if (t->kind() == kind) return true;
    if (auto opt = t->cast<c10::OptionalType>()) return opt->getElementType()->kind() == kind;
    return false;
  };
  if (v.isNone()) return py::none();
  if (match(c10::ScalarTypeType::Kind)) {
    return py::reinterpret_borrow<py::object>(
        reinterpret_cast<PyObject*>(torch::getTHPDtype(static_cast<c10::ScalarType>(v.toInt()))));
  }
  if (match(c10::LayoutType::Kind)) {
    return py::reinterpret_borrow<py::object>(
        reinterpret_cast<PyObject*>(torch::getTHPLayout(static_cast<c10::Layout>(v.toInt()))));
  }
  if (match(c10::MemoryFormatType::Kind)) {
    return py::reinterpret_borrow<py::object>(
        torch::utils::getTHPMemoryFormat(static_cast<c10::MemoryFormat>(v.toInt())));
  }
  return torch::jit::toPyObject(v);
}

// The same args/kwargs split as the Python dispatch fallback (trailing defaults dropped, kwarg-only by name).
std::pair<py::tuple, py::dict> to_py_args(const c10::OperatorHandle& op, const torch::jit::Stack& stack) {
  const auto& schema = op.schema();
  const auto& sargs = schema.arguments();
  const size_t n = sargs.size();
  const size_t base = stack.size() - n;
  auto is_default = [&](size_t i) {
    const auto& d = sargs[i].default_value();
    return d.has_value() && *d == stack[base + i];
  };
  size_t kw_start = n;
  for (; kw_start > 0; kw_start--) {
    if (!sargs[kw_start - 1].kwarg_only()) break;
  }
  size_t pos_end = kw_start;
  for (; pos_end > 0; pos_end--) {
    if (!is_default(pos_end - 1)) break;
  }
  py::tuple args(pos_end);
  for (size_t i = 0; i < pos_end; ++i) args[i] = arg_to_py(sargs[i], stack[base + i]);
  py::dict kwargs;
  for (size_t i = kw_start; i < n; ++i) {
    if (is_default(i)) continue;
    kwargs[py::str(sargs[i].name())] = arg_to_py(sargs[i], stack[base + i]);
  }
  return {std::move(args), std::move(kwargs)};
}

// While the Recorder's Python code runs: neither this hook nor the pass-through mode sees its ops (as under the
// Python recorder, whose mode is popped while its handler runs).
const c10::DispatchKeySet kPythonSide = c10::DispatchKeySet(c10::DispatchKey::Fake) |
    c10::DispatchKeySet(c10::DispatchKey::Python) | c10::DispatchKeySet(c10::DispatchKey::PythonTLSSnapshot);

inline int64_t storage_key(const at::Tensor& t) {
  if (!t.defined() || !t.has_storage()) return 0;
  return reinterpret_cast<int64_t>(t.storage().unsafeGetStorageImpl()->data_ptr().get());
}

// Before an op writes into storage the Recorder still references: let it copy what it holds (on_write(ptr)).
void guard_writes(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  State* st = g_state;
  const auto& sargs = op.schema().arguments();
  const size_t n = sargs.size();
  const size_t base = stack->size() - n;
  std::vector<int64_t> hits;
  {
    std::lock_guard<std::mutex> lock(st->mu);
    auto check = [&](const at::Tensor& t) {
      const int64_t p = storage_key(t);
      if (p != 0 && st->watched.erase(p) > 0) hits.push_back(p);
    };
    for (size_t i = 0; i < n; ++i) {
      const auto* alias = sargs[i].alias_info();
      if (alias == nullptr || !alias->isWrite()) continue;
      const auto& v = (*stack)[base + i];
      if (v.isTensor()) {
        check(v.toTensor());
      } else if (v.isList()) {
        for (const auto& x : v.toListRef()) {
          if (x.isTensor()) check(x.toTensor());
        }
      }
    }
  }
  if (hits.empty()) return;
  py::gil_scoped_acquire gil;
  c10::impl::ExcludeDispatchKeyGuard guard(kPythonSide);
  try {
    for (int64_t p : hits) st->on_write(p);
  } catch (...) {
    python_key_off();
    throw;
  }
  python_key_off();
}

void slow_path(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack, int64_t index,
               int64_t slot, bool is_new) {
  State* st = g_state;
  py::object pending;
  {
    py::gil_scoped_acquire gil;
    c10::impl::ExcludeDispatchKeyGuard guard(kPythonSide);
    auto func = torch::detail::getTorchApiFunction(op);
    auto ak = to_py_args(op, *stack);
    pending = st->before(func, ak.first, ak.second, index, slot, is_new);
    python_key_off();
    if (pending.is_none()) {  // the signature needs no more samples: only count this key from now on
      if (slot >= 0) {
        std::lock_guard<std::mutex> lock(st->mu);
        st->slots[slot].count_only = true;
      }
      pending = py::object();
    } else if (pending.ptr() == Py_False) {  // not this call, but ask again (diverse samples, K > 1)
      pending = py::object();
    }
  }
  const auto n_ret = op.schema().returns().size();
  try {
    redispatch(op, ks, stack);
  } catch (...) {
    if (pending) {
      py::gil_scoped_acquire gil;
      pending = py::object();
    }
    throw;
  }
  if (!pending) return;
  py::gil_scoped_acquire gil;
  c10::impl::ExcludeDispatchKeyGuard guard(kPythonSide);
  py::object out;
  if (n_ret == 0) {
    out = py::none();
  } else if (n_ret == 1) {
    out = torch::jit::toPyObject(stack->back());
  } else {
    py::tuple t(n_ret);
    for (size_t i = 0; i < n_ret; ++i) t[i] = torch::jit::toPyObject((*stack)[stack->size() - n_ret + i]);
    out = t;
  }
  bool saturated;
  try {
    saturated = st->after(pending, out).cast<bool>();
  } catch (...) {
    pending = py::object();  // while the GIL is held
    python_key_off();
    throw;
  }
  python_key_off();
  pending = py::object();
  if (slot >= 0 && saturated) {
    std::lock_guard<std::mutex> lock(st->mu);
    st->slots[slot].count_only = true;
  }
}

void enable(py::object before, py::object after, py::object on_write) {
  TORCH_CHECK(g_state == nullptr || !g_state->active, "tapml native recorder already active");
  delete g_state;
  g_state = new State();
  g_state->before = std::move(before);
  g_state->after = std::move(after);
  g_state->on_write = std::move(on_write);
  g_state->active = true;
  c10::impl::tls_set_dispatch_key_included(c10::DispatchKey::Fake, true);
  // The caller has pushed a (pass-through) TorchDispatchMode, so that composite kernels that ask whether a
  // dispatch mode is on (at::isTensorSubclassLike: reshape -> view instead of _reshape_alias, ...) decompose
  // as under the Python recorder; its Python key is switched off so that it is not called for every op.
  c10::impl::tls_set_dispatch_key_included(c10::DispatchKey::Python, false);
  c10::impl::tls_set_dispatch_key_included(c10::DispatchKey::PythonTLSSnapshot, false);
}

void disable() {
  c10::impl::tls_set_dispatch_key_included(c10::DispatchKey::Fake, false);
  if (g_state != nullptr) {
    g_state->active = false;
    g_state->before = py::object();
    g_state->after = py::object();
    g_state->on_write = py::object();
    g_state->watched.clear();
  }
}

// Storages (by data pointer) whose next write must first call on_write.
void watch(int64_t ptr) {
  if (!g_state || ptr == 0) return;
  std::lock_guard<std::mutex> lock(g_state->mu);
  g_state->watched.insert(ptr);
}

void unwatch(int64_t ptr) {
  if (!g_state) return;
  std::lock_guard<std::mutex> lock(g_state->mu);
  g_state->watched.erase(ptr);
}

void set_trace(bool on) {
  if (g_state) g_state->trace = on;
}

// The names (aten.add.Tensor) of the calls seen since tracing started; for tests.
std::vector<std::string> take_trace() {
  std::vector<std::string> out;
  if (!g_state) return out;
  std::lock_guard<std::mutex> lock(g_state->mu);
  for (auto* op : g_state->traced) {
    auto name = op->schema().name();
    auto p = name.find("::");
    if (p != std::string::npos) name.replace(p, 2, ".");
    const auto& ov = op->schema().overload_name();
    out.push_back(name + "." + (ov.empty() ? std::string("default") : ov));
  }
  g_state->traced.clear();
  return out;
}

int64_t calls() {
  if (!g_state) return 0;
  std::lock_guard<std::mutex> lock(g_state->mu);
  return g_state->calls;
}

// (slot, calls since the last take) for every slot with calls; resets them.
std::vector<std::pair<int64_t, int64_t>> take_counts() {
  std::vector<std::pair<int64_t, int64_t>> out;
  if (!g_state) return out;
  std::lock_guard<std::mutex> lock(g_state->mu);
  for (size_t i = 0; i < g_state->slots.size(); ++i) {
    auto& s = g_state->slots[i];
    if (s.count) {
      out.emplace_back(static_cast<int64_t>(i), s.count);
      s.count = 0;
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(_, Fake, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&fallback>());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("enable", &enable);
  m.def("disable", &disable);
  m.def("calls", &calls);
  m.def("watch", &watch);
  m.def("unwatch", &unwatch);
  m.def("set_trace", &set_trace);
  m.def("take_trace", &take_trace);
  m.def("take_counts", &take_counts);
}
