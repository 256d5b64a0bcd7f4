// MoE routing, one block per token, matching src/model/router.rs: scores by sigmoid or
// softmax; selection on score + correction bias; group limiting (noaux_tc: groups ranked
// by the sum of their two best biased scores; group_limited_greedy: by their best);
// weights from the unbiased scores, normalised when asked, times the scaling factor.
// Ties go to the lower index everywhere.

#define MAX_EXPERTS 1024
#define MAX_GROUPS 64

// scoring: 0 sigmoid, 1 softmax. method: 0 noaux_tc, 1 greedy, 2 group_limited_greedy.
extern "C" __global__ void route_topk(const float* logits, const float* bias, int n_experts,
                                      int n_group, int topk_group, int k, int scoring, int method,
                                      int norm_topk, float scaling, int* out_ids, float* out_w) {
    __shared__ float score[MAX_EXPERTS];
    __shared__ float choice[MAX_EXPERTS];
    __shared__ float scratch[32];
    const float* l = logits + (size_t)blockIdx.x * n_experts;
    float local_max = -INFINITY;
    for (int e = threadIdx.x; e < n_experts; e += blockDim.x) local_max = fmaxf(local_max, l[e]);
    float mx = block_max(local_max, scratch);
    float local_sum = 0.0f;
    for (int e = threadIdx.x; e < n_experts; e += blockDim.x) {
        float s = scoring == 0 ? 1.0f / (1.0f + expf(-l[e])) : expf(l[e] - mx);
        score[e] = s;
        local_sum += s;
    }
    float total = block_sum(local_sum, scratch);
    for (int e = threadIdx.x; e < n_experts; e += blockDim.x) {
        if (scoring == 1) score[e] /= total;
        choice[e] = score[e] + (bias ? bias[e] : 0.0f);
    }
    __syncthreads();
    if (threadIdx.x != 0) return;

    if (n_group > 1 && method != 1) {
        int per = n_experts / n_group;
        float gscore[MAX_GROUPS];
        for (int g = 0; g < n_group; g++) {
            float b1 = -INFINITY, b2 = -INFINITY;
            for (int e = g * per; e < (g + 1) * per; e++) {
                float v = choice[e];
                if (v > b1) { b2 = b1; b1 = v; } else if (v > b2) { b2 = v; }
            }
            gscore[g] = method == 0 ? b1 + b2 : b1;
        }
        bool kept[MAX_GROUPS];
        for (int g = 0; g < n_group; g++) kept[g] = false;
        for (int r = 0; r < topk_group; r++) {
            int best = -1;
            for (int g = 0; g < n_group; g++)
                if (!kept[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
            kept[best] = true;
        }
        for (int g = 0; g < n_group; g++)
            if (!kept[g])
                for (int e = g * per; e < (g + 1) * per; e++) choice[e] = -INFINITY;
    }
    int* ids = out_ids + (size_t)blockIdx.x * k;
    float* w = out_w + (size_t)blockIdx.x * k;
    float sum = 0.0f;
    for (int r = 0; r < k; r++) {
        int best = -1;
        for (int e = 0; e < n_experts; e++) {
            bool taken = false;
            for (int q = 0; q < r; q++) taken |= ids[q] == e;
            if (!taken && (best < 0 || choice[e] > choice[best])) best = e;
        }
        ids[r] = best;
        w[r] = score[best];
        sum += score[best];
    }
    float inv = norm_topk ? 1.0f / (sum + 1e-20f) : 1.0f;
    for (int r = 0; r < k; r++) w[r] = w[r] * inv * scaling;
}
