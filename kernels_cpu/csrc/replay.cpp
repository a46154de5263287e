// CPU graphs: a forward recorded as the operator calls it made (platforms/cpu/graphs.py), replayed through the
// dispatcher without Python. Values live in numbered slots: the step's inputs first, then each tensor an operator
// returned. An argument is a slot, a list of slots, a constant kept from the capture, or the schema's default.
// The one source that includes Python's and pybind's headers, which take most of its build.
#include <string>
#include <vector>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/utils/pybind.h>

namespace torch::jit {
// Python to IValue, from libtorch_python; its header, pybind_utils.h, brings TorchScript's Python bindings along
// and took 6 of this source's 19 s of build.
c10::IValue toIValue(py::handle obj, const c10::TypePtr& type, std::optional<int32_t> N = std::nullopt);
}  // namespace torch::jit

namespace {

struct Argument {
  enum Kind { kSlot, kSlots, kConstant } kind;
  std::vector<int64_t> slots;   // kSlots: -1 for None in a Tensor?[] (an index like x[:, i])
  c10::IValue constant;
  bool optional_elements = false;
};

struct Call {
  c10::OperatorHandle op;
  std::vector<Argument> arguments;
  std::vector<std::vector<int64_t>> returns;   // each return's slot, or its list's slots; -1: not kept
  std::vector<bool> returns_list;
  std::vector<int64_t> release;                // slots whose last use is this call
};

class Replay {
 public:
  explicit Replay(int64_t num_slots) : num_slots_(num_slots) {}

  // `arguments`: one (kind, value) pair per schema argument, kind "slot", "slots", "constant" or "default".
  void add(const std::string& name, const std::string& overload, const py::list& arguments,
           std::vector<std::vector<int64_t>> returns, std::vector<int64_t> release) {
    Call call{c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str())};
    const c10::FunctionSchema& schema = call.op.schema();
    TORCH_CHECK(arguments.size() == schema.arguments().size(), name, ": ", arguments.size(),
                " arguments recorded for a schema of ", schema.arguments().size());
    for (size_t i = 0; i < arguments.size(); ++i) {
      const auto pair = arguments[i].cast<py::tuple>();
      const auto kind = pair[0].cast<std::string>();
      const c10::Argument& formal = schema.arguments()[i];
      if (kind == "slot") {
        call.arguments.push_back({Argument::kSlot, {pair[1].cast<int64_t>()}, {}});
      } else if (kind == "slots") {
        const auto* list = formal.type()->castRaw<c10::ListType>();
        TORCH_CHECK(list, name, ": a list of tensors recorded for ", formal.name(), ", which is not a list");
        call.arguments.push_back({Argument::kSlots, pair[1].cast<std::vector<int64_t>>(), {},
                                  list->getElementType()->kind() == c10::TypeKind::OptionalType});
      } else if (kind == "constant") {
        call.arguments.push_back({Argument::kConstant, {}, torch::jit::toIValue(pair[1], formal.type())});
      } else {
        TORCH_CHECK(kind == "default" && formal.default_value(), name, ": no value for ", formal.name());
        call.arguments.push_back({Argument::kConstant, {}, *formal.default_value()});
      }
    }
    for (const c10::Argument& result : schema.returns())
      call.returns_list.push_back(result.type()->kind() == c10::TypeKind::ListType);
    TORCH_CHECK(returns.size() <= schema.returns().size(), name, ": more returns recorded than it has");
    call.returns = std::move(returns);
    call.release = std::move(release);
    calls_.push_back(std::move(call));
  }

  std::vector<at::Tensor> run(const std::vector<at::Tensor>& inputs, const std::vector<int64_t>& outputs) const {
    std::vector<c10::IValue> slots(num_slots_);
    for (size_t i = 0; i < inputs.size(); ++i) slots[i] = inputs[i];
    torch::jit::Stack stack;
    for (const Call& call : calls_) {
      stack.clear();
      for (const Argument& argument : call.arguments) {
        if (argument.kind == Argument::kSlot) {
          stack.push_back(slots[argument.slots[0]]);
        } else if (argument.kind == Argument::kSlots && argument.optional_elements) {
          c10::List<std::optional<at::Tensor>> list;
          for (int64_t slot : argument.slots)
            list.push_back(slot < 0 ? std::nullopt : std::optional<at::Tensor>(slots[slot].toTensor()));
          stack.emplace_back(std::move(list));
        } else if (argument.kind == Argument::kSlots) {
          c10::List<at::Tensor> list;
          for (int64_t slot : argument.slots) list.push_back(slots[slot].toTensor());
          stack.emplace_back(std::move(list));
        } else {
          stack.push_back(argument.constant);
        }
      }
      call.op.callBoxed(stack);
      for (size_t r = 0; r < call.returns.size(); ++r) {
        if (!call.returns_list[r]) {
          if (call.returns[r][0] >= 0) slots[call.returns[r][0]] = std::move(stack[r]);
          continue;
        }
        const auto list = stack[r].toTensorList();
        TORCH_CHECK(list.size() == call.returns[r].size(), call.op.schema().name(), " returned ", list.size(),
                    " tensors where the capture had ", call.returns[r].size());
        for (size_t j = 0; j < list.size(); ++j)
          if (call.returns[r][j] >= 0) slots[call.returns[r][j]] = list.get(j);
      }
      for (int64_t slot : call.release) slots[slot] = c10::IValue();
    }
    std::vector<at::Tensor> results;
    for (int64_t slot : outputs) results.push_back(slots[slot].toTensor());
    return results;
  }

  size_t size() const { return calls_.size(); }

 private:
  int64_t num_slots_;
  std::vector<Call> calls_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Replay>(m, "Replay", "operator calls recorded from a forward, replayed without Python")
      .def(py::init<int64_t>(), py::arg("num_slots"))
      .def("add", &Replay::add, "append a call: op name, overload, arguments, return slots, slots to release")
      .def("run", &Replay::run, py::call_guard<py::gil_scoped_release>(),
           "replay every call on new inputs; the tensors in `outputs` slots")
      .def("__len__", &Replay::size);
}
