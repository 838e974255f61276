// Model::plan's native half: a model (and generator) built over the meta op set, whose
// constructors count every buffer they would allocate (ops/meta_ops.h).
#include "sppo/generate.h"
#include "sppo/model.h"

namespace sppo {

template <class T>
MemoryReport plan_memory(const ModelConfig& config, const MemoryPlan& plan, const LoraConfig& lora,
                         const BackendFootprint& footprint, const OptimizerConfig::Kind* optimizer,
                         const GeneratorPlan* generator) {
  Model<T> model(config, plan, std::make_unique<MetaOps<T>>(footprint), /*initialize=*/false, lora);
  if (optimizer) {
    OptimizerConfig oc;
    oc.kind = *optimizer;
    model.set_optimizer(oc);
  }
  MemoryReport r = model.memory();
  if (generator) r.kv_cache = model.make_generator(*generator)->memory_bytes();
  return r;
}

template MemoryReport plan_memory<float>(const ModelConfig&, const MemoryPlan&, const LoraConfig&,
                                         const BackendFootprint&, const OptimizerConfig::Kind*, const GeneratorPlan*);
template MemoryReport plan_memory<bf16>(const ModelConfig&, const MemoryPlan&, const LoraConfig&,
                                        const BackendFootprint&, const OptimizerConfig::Kind*, const GeneratorPlan*);

}  // namespace sppo
