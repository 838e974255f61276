// bf16 gradient accumulation (MemoryPlan::bf16_gradients) against the Master gradients of the
// same model, on any backend: memory_test runs it on the CPU, cuda_model_test on a GPU. The
// checks are exact, because the staged gradient of a micro-batch is computed by the same ops in
// the same order as the Master one:
//   - one micro-batch: every bf16 gradient is the Master gradient rounded to bf16, bit for bit
//     (a wrong offset in the staging of any tensor or layer breaks it);
//   - several: the bf16 buffer is the host's replay of g = bf16(float(g) + x_j) over the Master
//     gradients x_j of each micro-batch alone (add_round's contract);
//   - embedding rows of tokens absent from every micro-batch stay exactly zero;
//   - an optimizer step over the bf16 buffer (clipped, AdamW and RMSprop) equals a step of the
//     Master model given the same gradient values widened, bit for bit: norm, master weights and
//     parameters; one that would overflow is refused by the dry run over the bf16 buffer, leaving
//     the parameters as they were.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/bf16.h"
#include "core/rng.h"
#include "sppo/model.h"
#include "tests/harness.h"

namespace sppo::testutil {

template <class T>
std::vector<master_t<T>> master_grads(Model<T>& m) {
  std::vector<master_t<T>> g(size_t(m.num_trainable()));
  m.ops().download_bytes(g.data(), m.grad_data(), g.size() * sizeof(master_t<T>));
  return g;
}

template <class T>
std::vector<bf16> bf16_grads(Model<T>& m) {
  std::vector<bf16> g(size_t(m.num_trainable()));
  m.ops().download_bytes(g.data(), m.grad16_data(), g.size() * sizeof(bf16));
  return g;
}

// `make(bf16_gradients)` builds a model with untied embeddings (a tied tensor takes two roundings
// a micro-batch, the head's and the embedding's); two calls must give identical weights. `batches`
// micro-batches of B rows × S tokens with ids below half the vocabulary (so the upper half of
// the embedding is absent), run through `accumulate(model, tokens, mask)`.
template <class T>
void check_bf16_gradients(const std::string& what, const std::function<std::unique_ptr<Model<T>>(bool)>& make,
                          const std::function<void(Model<T>&, const int32_t*, const uint8_t*)>& accumulate, int64_t B,
                          int64_t S, int batches) {
  using M = master_t<T>;
  std::unique_ptr<Model<T>> full = make(false), half = make(true);
  EXPECT_TRUE(half->grad_data() == nullptr && half->grad16_data() != nullptr, what << ": no bf16 gradient buffer");
  const int64_t V = full->config().vocab_size, C = full->config().hidden_size, n = full->num_trainable();
  std::vector<bf16> replay(static_cast<size_t>(n));  // bf16 zero
  std::vector<M> last;
  for (int j = 0; j < batches; ++j) {
    std::vector<int32_t> tokens(size_t(B * S));
    std::vector<uint8_t> mask(tokens.size());
    for (size_t i = 0; i < tokens.size(); ++i) {
      tokens[i] = int32_t(uniform01(77, uint64_t(j), i) * double(V / 2));
      mask[i] = int64_t(i) % S >= S / 4;
    }
    full->zero_grad();
    accumulate(*full, tokens.data(), mask.data());
    accumulate(*half, tokens.data(), mask.data());
    last = master_grads(*full);
    for (int64_t i = 0; i < n; ++i) replay[i] = bf16(float(replay[i]) + float(last[i]));
    if (j == 0) {
      const std::vector<bf16> got = bf16_grads(*half);
      int64_t nonzero = 0;
      for (const ParamInfo& p : full->params())
        for (int64_t i = p.offset; i < p.offset + p.size; ++i) {
          nonzero += last[i] != 0;
          if (got[i].bits != bf16(float(last[i])).bits) {
            EXPECT_TRUE(false, what << ": after one micro-batch, " << p.name << "[" << i - p.offset << "] is "
                                    << float(got[i]) << " in bf16, the Master gradient " << last[i]);
            return;
          }
        }
      EXPECT_TRUE(nonzero > n / 2, what << ": only " << nonzero << " of " << n << " gradients are nonzero");
    }
  }
  const std::vector<bf16> got = bf16_grads(*half);
  for (const ParamInfo& p : full->params())
    for (int64_t i = p.offset; i < p.offset + p.size; ++i)
      if (got[i].bits != replay[i].bits) {
        EXPECT_TRUE(false, what << ": after " << batches << " micro-batches, " << p.name << "[" << i - p.offset
                                << "] is " << float(got[i]) << ", the replayed rounding " << float(replay[i]));
        return;
      }
  const ParamInfo& embed = full->param("model.embed_tokens.weight");
  for (int64_t i = V / 2 * C; i < V * C; ++i)
    EXPECT_TRUE(got[embed.offset + i].bits == 0, what << ": embedding row " << i / C
                                                      << " (a token absent from the batches) has gradient "
                                                      << float(got[embed.offset + i]));

  // The alignment padding between tensors holds no gradient (the norm would count it).
  std::vector<bool> in_tensor(static_cast<size_t>(n), false);
  for (const ParamInfo& p : full->params()) std::fill_n(in_tensor.begin() + p.offset, p.size, true);
  for (int64_t i = 0; i < n; ++i)
    if (!in_tensor[i] && got[i].bits != 0) {
      EXPECT_TRUE(false,
                  what << ": arena element " << i << ", padding between tensors, has gradient " << float(got[i]));
      return;
    }

  // The step: the Master model gets the bf16 values, widened, as its gradients.
  std::vector<M> widened(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) widened[i] = M(float(got[i]));
  double host_sq = 0;
  for (int64_t i = 0; i < n; ++i) host_sq += double(widened[i]) * double(widened[i]);
  for (auto kind : {OptimizerConfig::Kind::AdamW, OptimizerConfig::Kind::RMSprop}) {
    const char* name = kind == OptimizerConfig::Kind::AdamW ? "adamw" : "rmsprop";
    std::unique_ptr<Model<T>> a = make(false), b = make(true);
    OptimizerConfig oc;
    oc.kind = kind, oc.lr = 1e-2, oc.weight_decay = 0.1;
    oc.max_grad_norm = 0.5 * std::sqrt(host_sq);  // clipping engages
    a->set_optimizer(oc);
    b->set_optimizer(oc);
    a->ops().upload_bytes(a->grad_data(), widened.data(), widened.size() * sizeof(M));
    b->ops().upload_bytes(b->grad16_data(), got.data(), got.size() * sizeof(bf16));
    const StepResult ra = a->optimizer_step(), rb = b->optimizer_step();
    EXPECT_TRUE(ra.grad_norm == rb.grad_norm, what << ", " << name << ": gradient norm " << rb.grad_norm
                                                   << " over bf16, " << ra.grad_norm
                                                   << " over the same values in Master precision");
    EXPECT_TRUE(std::fabs(rb.grad_norm - std::sqrt(host_sq)) <= 1e-12 * std::sqrt(host_sq),
                what << ", " << name << ": gradient norm " << rb.grad_norm << ", the host's " << std::sqrt(host_sq));
    for (const ParamInfo& p : a->params()) {
      std::vector<M> wa(size_t(p.size)), wb(size_t(p.size));
      a->get_param(p.name, wa.data());
      b->get_param(p.name, wb.data());
      EXPECT_TRUE(std::memcmp(wa.data(), wb.data(), wa.size() * sizeof(M)) == 0,
                  what << ", " << name << ": " << p.name << " after the step differs from the Master model's");
    }
    const std::vector<bf16> after = bf16_grads(*b);
    bool zeroed = true;
    for (const bf16& g : after) zeroed &= g.bits == 0;
    EXPECT_TRUE(zeroed, what << ", " << name << ": the step left bf16 gradients behind");

    // A step that would overflow (lr 3e38): the dry run over the bf16 gradients refuses it before
    // anything is written, and the gradients are discarded.
    std::unique_ptr<Model<T>> c = make(true);
    OptimizerConfig huge = oc;
    huge.lr = 3e38, huge.max_grad_norm = 0;
    c->set_optimizer(huge);
    c->ops().upload_bytes(c->grad16_data(), got.data(), got.size() * sizeof(bf16));
    std::vector<std::vector<M>> before;
    for (const ParamInfo& p : c->params()) {
      before.emplace_back(size_t(p.size));
      c->get_param(p.name, before.back().data());
    }
    EXPECT_THROWS_WITH(c->optimizer_step(), "would write non-finite parameters");
    for (size_t k = 0; k < c->params().size(); ++k) {
      const ParamInfo& p = c->params()[k];
      std::vector<M> w(size_t(p.size));
      c->get_param(p.name, w.data());
      EXPECT_TRUE(std::memcmp(w.data(), before[k].data(), w.size() * sizeof(M)) == 0,
                  what << ", " << name << ": the refused step changed " << p.name);
    }
    EXPECT_TRUE(c->optimizer_steps() == 0, what << ", " << name << ": the refused step was counted");
    bool discarded = true;
    for (const bf16& g : bf16_grads(*c)) discarded &= g.bits == 0;
    EXPECT_TRUE(discarded, what << ", " << name << ": the refused step kept its gradients");
  }
}

}  // namespace sppo::testutil
