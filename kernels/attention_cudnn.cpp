// kernels/attention_cudnn.cpp: the attention op through cuDNN's fused SDPA
// (see attention_cudnn.h). The only C++ translation unit of kernels/: the
// cuDNN frontend is a header-only C++17 graph API, and everything it needs
// stays in this file behind the C functions of the header.
//
// One forward and one backward graph per shape, built on first use and kept
// for the life of the handle (a training run meets one or two shapes: the
// training and the eval batch). The backward graph asks for cuDNN's
// deterministic algorithm, so that two runs of the same step give the same
// bits (resumes stay bit-identical), unless the shape is marked
// nondeterministic: the deterministic backward's workspace is B x H x T x T
// bf16 on Hopper (7.8 GB at T = 11008 with 32 heads), the other's a few
// copies of dQ in fp32; a shape whose graphs cuDNN does not
// build (too old a library, an unsupported head dimension) is refused by
// prepare, and the caller runs memtune's own kernel instead.
#include <cuda_runtime.h>
#include <cudnn.h>

#include <cudnn_frontend.h>

#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <unordered_map>

#include "kernels/attention_cudnn.h"
#include "kernels/common.h"

namespace fe = cudnn_frontend;

namespace {

// The tensors' ids in the variant packs.
enum : int64_t { kQ = 1, kK, kV, kO, kStats, kDO, kDQ, kDK, kDV };

typedef std::tuple<int, int, int, int, int, int, float, int> shape_key;

struct attention_graphs {
    bool ok = false;
    std::string why;  // when not ok: what cuDNN said
    std::shared_ptr<fe::graph::Graph> forward, backward;
    int64_t workspace = 0;          // the larger of the two graphs'
    int64_t forward_workspace = 0;  // the forward's (a forward-only shape's)
};

shape_key key_of(const mt_attention_shape *s) {
    return shape_key(s->B, s->T, s->H, s->KV, s->D, s->window, s->scale, s->nondeterministic);
}

// The scores' scale: the shape's, or 1/sqrt(D).
float attention_scale(const mt_attention_shape *s) { return s->scale != 0.0f ? s->scale : 1.0f / sqrtf((float)s->D); }

// Strides of the op's layouts, as cuDNN's (b, h, s, d) dims see them.
std::vector<int64_t> bhsd_strides(int H, int T, int D) {  // (B, H, T, D): q, k, v, dq, dk, dv
    return {(int64_t)H * T * D, (int64_t)T * D, D, 1};
}
std::vector<int64_t> bshd_strides(int H, int T, int D) {  // (B, T, H, D): out, dout
    return {(int64_t)T * H * D, D, (int64_t)H * D, 1};
}

std::shared_ptr<fe::graph::Tensor_attributes> tensor(fe::graph::Graph &g, const char *name, int64_t uid,
                                                     std::vector<int64_t> dims, std::vector<int64_t> strides) {
    return g.tensor(fe::graph::Tensor_attributes().set_name(name).set_uid(uid).set_dim(dims).set_stride(strides));
}

std::shared_ptr<fe::graph::Graph> new_graph() {
    auto g = std::make_shared<fe::graph::Graph>();
    g->set_io_data_type(fe::DataType_t::BFLOAT16)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    return g;
}

// q, k and v as both graphs read them.
std::tuple<std::shared_ptr<fe::graph::Tensor_attributes>, std::shared_ptr<fe::graph::Tensor_attributes>,
           std::shared_ptr<fe::graph::Tensor_attributes>>
qkv_tensors(fe::graph::Graph &g, const mt_attention_shape *s) {
    int B = s->B, T = s->T, H = s->H, KV = s->KV, D = s->D;
    return {tensor(g, "q", kQ, {B, H, T, D}, bhsd_strides(H, T, D)),
            tensor(g, "k", kK, {B, KV, T, D}, bhsd_strides(KV, T, D)),
            tensor(g, "v", kV, {B, KV, T, D}, bhsd_strides(KV, T, D))};
}

std::shared_ptr<fe::graph::Graph> forward_graph(const mt_attention_shape *s) {
    auto g = new_graph();
    int B = s->B, T = s->T, H = s->H, D = s->D;
    auto [q, k, v] = qkv_tensors(*g, s);
    auto options = fe::graph::SDPA_attributes()
                       .set_name("attention")
                       .set_generate_stats(true)
                       .set_causal_mask(true)
                       .set_attn_scale(attention_scale(s));
    if (s->window > 0) options.set_diagonal_band_left_bound(s->window);
    auto [o, stats] = g->sdpa(q, k, v, options);
    o->set_output(true).set_uid(kO).set_dim({B, H, T, D}).set_stride(bshd_strides(H, T, D));
    stats->set_output(true).set_uid(kStats).set_data_type(fe::DataType_t::FLOAT);
    return g;
}

std::shared_ptr<fe::graph::Graph> backward_graph(const mt_attention_shape *s) {
    auto g = new_graph();
    int B = s->B, T = s->T, H = s->H, KV = s->KV, D = s->D;
    auto [q, k, v] = qkv_tensors(*g, s);
    auto o = tensor(*g, "o", kO, {B, H, T, D}, bshd_strides(H, T, D));
    auto dout = tensor(*g, "dout", kDO, {B, H, T, D}, bshd_strides(H, T, D));
    auto stats = tensor(*g, "stats", kStats, {B, H, T, 1}, {(int64_t)H * T, T, 1, 1});
    stats->set_data_type(fe::DataType_t::FLOAT);
    auto options = fe::graph::SDPA_backward_attributes()
                       .set_name("attention_backward")
                       .set_causal_mask(true)
                       .set_attn_scale(attention_scale(s))
                       .set_deterministic_algorithm(!s->nondeterministic);
    if (s->window > 0) options.set_diagonal_band_left_bound(s->window);
    auto [dq, dk, dv] = g->sdpa_backward(q, k, v, o, dout, stats, options);
    dq->set_output(true).set_uid(kDQ).set_dim({B, H, T, D}).set_stride(bhsd_strides(H, T, D));
    dk->set_output(true).set_uid(kDK).set_dim({B, KV, T, D}).set_stride(bhsd_strides(KV, T, D));
    dv->set_output(true).set_uid(kDV).set_dim({B, KV, T, D}).set_stride(bhsd_strides(KV, T, D));
    return g;
}

// validate, lower, pick cuDNN's heuristic plan, check it runs here, build it.
fe::error_t build(fe::graph::Graph &g, cudnnHandle_t handle) {
    fe::error_t e = g.validate();
    if (e.is_good()) e = g.build_operation_graph(handle);
    if (e.is_good()) e = g.create_execution_plans({fe::HeurMode_t::A});
    if (e.is_good()) e = g.check_support(handle);
    if (e.is_good()) e = g.build_plans(handle);
    return e;
}

}  // namespace

struct mt_cudnn {
    cudnnHandle_t handle = nullptr;
    char describe[64] = {0};
    std::map<shape_key, attention_graphs> graphs;
};

static void cudnn_check(cudnnStatus_t st, const char *call, const char *file, int line) {
    if (st != CUDNN_STATUS_SUCCESS) mt_fatal(file, line, "%s failed: %s", call, cudnnGetErrorString(st));
}
#define CUDNN_CHECK(call) cudnn_check((call), #call, __FILE__, __LINE__)

extern "C" mt_cudnn *mt_cudnn_init(char *why, size_t len) {
    size_t version = cudnnGetVersion();
    // the graph API's fused attention with GQA, windows and a deterministic
    // backward on Hopper: cuDNN 9.x; the headers built against set the floor
    if (version < 90000 || version / 10000 != CUDNN_MAJOR) {
        snprintf(why, len, "cuDNN %zu.%zu.%zu is loaded; memtune was built against %d.%d and needs 9.x",
                 version / 10000, version / 100 % 100, version % 100, CUDNN_MAJOR, CUDNN_MINOR);
        return nullptr;
    }
    cudnnHandle_t handle;
    cudnnStatus_t st = cudnnCreate(&handle);
    if (st != CUDNN_STATUS_SUCCESS) {
        snprintf(why, len, "cudnnCreate failed: %s", cudnnGetErrorString(st));
        cudaGetLastError();
        return nullptr;
    }
    mt_cudnn *c = new mt_cudnn;
    c->handle = handle;
    snprintf(c->describe, sizeof c->describe, "cuDNN %zu.%zu.%zu", version / 10000, version / 100 % 100, version % 100);
    return c;
}

extern "C" void mt_cudnn_free(mt_cudnn *c) {
    if (!c) return;
    c->graphs.clear();
    CUDNN_CHECK(cudnnDestroy(c->handle));
    delete c;
}

extern "C" const char *mt_cudnn_describe(const mt_cudnn *c) { return c ? c->describe : "no cuDNN"; }

extern "C" int mt_cudnn_attention_prepare(mt_cudnn *c, const mt_attention_shape *s, size_t *workspace) {
    if (!c || s->docs) return 0;  // packed documents: memtune's kernel (no ragged graphs built yet)
    auto found = c->graphs.find(key_of(s));
    if (found == c->graphs.end()) {
        attention_graphs a;
        a.forward = forward_graph(s);
        a.backward = backward_graph(s);
        fe::error_t e = build(*a.forward, c->handle);
        const char *which = "forward";
        if (e.is_good()) e = build(*a.backward, c->handle), which = "backward";
        int64_t fw = 0, bw = 0;
        if (e.is_good()) e = a.forward->get_workspace_size(fw);
        if (e.is_good()) e = a.backward->get_workspace_size(bw);
        a.ok = e.is_good();
        a.workspace = fw > bw ? fw : bw;
        a.forward_workspace = fw;
        if (!a.ok) {
            a.why = std::string(which) + ": " + e.get_message();
            a.forward.reset(), a.backward.reset();
            mt_info(
                "attention B=%d T=%d H=%d KV=%d D=%d window=%d: cuDNN does not serve it (%s); memtune's kernel "
                "runs instead",
                s->B, s->T, s->H, s->KV, s->D, s->window, a.why.c_str());
        }
        cudaGetLastError();  // a refused plan may leave an error behind
        found = c->graphs.emplace(key_of(s), std::move(a)).first;
    }
    if (workspace) *workspace = (size_t)(s->forward_only ? found->second.forward_workspace : found->second.workspace);
    return found->second.ok;
}

static const attention_graphs &prepared(mt_cudnn *c, const mt_attention_shape *s) {
    auto found = c->graphs.find(key_of(s));
    MT_CHECK(found != c->graphs.end() && found->second.ok, "cuDNN attention B=%d T=%d H=%d KV=%d D=%d not prepared",
             s->B, s->T, s->H, s->KV, s->D);
    return found->second;
}

static void execute(mt_cudnn *c, fe::graph::Graph &g, std::unordered_map<int64_t, void *> &pack, void *workspace,
                    void *stream) {
    CUDNN_CHECK(cudnnSetStream(c->handle, (cudaStream_t)stream));
    fe::error_t e = g.execute(c->handle, pack, workspace);
    if (!e.is_good()) mt_fatal(__FILE__, __LINE__, "cuDNN attention failed: %s", e.get_message().c_str());
}

extern "C" void mt_cudnn_attention_forward(mt_cudnn *c, const mt_attention_shape *s, void *out, float *lse,
                                           const void *q, const void *k, const void *v, void *workspace, void *stream) {
    const attention_graphs &a = prepared(c, s);
    std::unordered_map<int64_t, void *> pack = {
        {kQ, (void *)q}, {kK, (void *)k}, {kV, (void *)v}, {kO, out}, {kStats, lse}};
    execute(c, *a.forward, pack, workspace, stream);
}

extern "C" void mt_cudnn_attention_backward(mt_cudnn *c, const mt_attention_shape *s, void *dq, void *dk, void *dv,
                                            const void *dout, const void *q, const void *k, const void *v,
                                            const void *out, const float *lse, void *workspace, void *stream) {
    const attention_graphs &a = prepared(c, s);
    std::unordered_map<int64_t, void *> pack = {{kQ, (void *)q},   {kK, (void *)k},     {kV, (void *)v},
                                                {kO, (void *)out}, {kDO, (void *)dout}, {kStats, (void *)lse},
                                                {kDQ, dq},         {kDK, dk},           {kDV, dv}};
    execute(c, *a.backward, pack, workspace, stream);
}
