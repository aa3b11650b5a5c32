/*
 * A simulator of librknnrt.so (rknn_api.h 2.3.2) for vision encoders: the same
 * calls, the same struct layouts, and stricter than the real runtime about how
 * they are used, so that every misuse is an error AND a counted violation.
 *
 * The "model" is a text header written by rkllm_core.sim.make_encoder:
 *
 *   RKNNSIM 1
 *   height=448  width=448  fmt=nhwc|nchw  input=uint8|float32
 *   tokens=196  embed=64  outputs=1  platform=rk3588|rk3576|...
 *   (one key=value a line, then an empty line)
 *
 * The "encoder": the input image is cut into a grid of gh x gw regions
 * (gh * gw == tokens, gh the largest divisor <= sqrt(tokens)), token t being
 * region (t / gw, t % gw) in reading order. Element k of token t in output j is
 * the mean of channel k % 3 over that region (uint8 input: value / 255; float
 * input: the value itself) plus j. So tests can see which colour reached which
 * region in which channel, and which output is which.
 *
 * Strictness (violation counters, each also an error return):
 *   struct_size_violations   rknn_query with a size that is not sizeof(result struct)
 *   input_violations         rknn_inputs_set with a wrong count, index, type, format,
 *                            size, pass_through or NULL buffer
 *   output_violations        rknn_outputs_get with a wrong count, index, want_float != 1
 *                            or is_prealloc != 0; getting outputs while earlier ones are
 *                            not released; releasing a buffer that is not outstanding
 *   invalid_context_calls    any call with a context that is not alive
 *   concurrent_run_violations two rknn_run at once on one context
 *   destroy_while_running    rknn_destroy during rknn_run
 * Leak counters: live_contexts, outputs_outstanding, outputs_leaked_at_destroy.
 * Settings (rknn_sim_set): run_delay_ms, fail_core_mask, fail_run, fail_outputs_get.
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef uint64_t rknn_context;

enum { RKNN_SUCC = 0, RKNN_ERR_FAIL = -1, RKNN_ERR_PARAM_INVALID = -5, RKNN_ERR_MODEL_INVALID = -6,
       RKNN_ERR_CTX_INVALID = -7, RKNN_ERR_INPUT_INVALID = -8, RKNN_ERR_OUTPUT_INVALID = -9 };
enum { Q_IN_OUT_NUM = 0, Q_INPUT_ATTR = 1, Q_OUTPUT_ATTR = 2, Q_SDK_VERSION = 5, Q_MEM_SIZE = 6,
       Q_CUSTOM_STRING = 7 };
enum { T_FLOAT32 = 0, T_FLOAT16 = 1, T_UINT8 = 3 };
enum { F_NCHW = 0, F_NHWC = 1, F_UNDEFINED = 3 };

#define MAX_DIMS 16
#define MAX_NAME 256
#define MAX_CTX 64
#define MAX_OUT 16

typedef struct { uint32_t n_input, n_output; } io_num_t;
typedef struct {
    uint32_t index, n_dims, dims[MAX_DIMS];
    char name[MAX_NAME];
    uint32_t n_elems, size;
    int fmt, type, qnt_type;
    int8_t fl;
    int32_t zp;
    float scale;
    uint32_t w_stride, size_with_stride;
    uint8_t pass_through;
    uint32_t h_stride;
} tensor_attr_t;
typedef struct { char api_version[256], drv_version[256]; } sdk_version_t;
typedef struct {
    uint32_t total_weight_size, total_internal_size;
    uint64_t total_dma_allocated_size;
    uint32_t total_sram_size, free_sram_size, reserved[10];
} mem_size_t;
typedef struct { char string[1024]; } custom_string_t;
typedef struct { uint32_t index; void *buf; uint32_t size; uint8_t pass_through; int type, fmt; } input_t;
typedef struct { uint8_t want_float, is_prealloc; uint32_t index; void *buf; uint32_t size; } output_t;

#if UINTPTR_MAX == 0xffffffffffffffffu
_Static_assert(sizeof(tensor_attr_t) == 376, "rknn_tensor_attr");
_Static_assert(sizeof(input_t) == 32, "rknn_input");
_Static_assert(sizeof(output_t) == 24, "rknn_output");
_Static_assert(sizeof(mem_size_t) == 64, "rknn_mem_size");
#endif

typedef struct {
    int used;
    uint32_t generation;
    int height, width, nchw, float_input, tokens, embed, outputs, max_mask;
    float *pixels;       /* H*W*3, HWC */
    int input_set;
    float *result;       /* outputs * tokens * embed, output-major */
    int has_result;
    void *outstanding[MAX_OUT];
    int running;
} sim_ctx;

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static sim_ctx g_ctx[MAX_CTX];
static uint32_t g_generation = 1;

#define COUNTERS(X) X(live_contexts) X(inits) X(init_failures) X(destroys) X(runs) X(core_mask_sets) \
    X(last_core_mask) X(outputs_gets) X(outputs_outstanding) X(outputs_released) X(outputs_leaked_at_destroy) \
    X(struct_size_violations) X(input_violations) X(output_violations) X(invalid_context_calls) \
    X(concurrent_run_violations) X(destroy_while_running) X(active_runs) X(max_active_runs) X(errors)
#define DECLARE(name) static long long c_##name;
COUNTERS(DECLARE)
static double s_run_delay_ms, s_fail_core_mask, s_fail_run, s_fail_outputs_get;

static rknn_context make_id(int slot, uint32_t gen) { return ((rknn_context)gen << 8) | (rknn_context)(slot + 1); }

/* The live context behind an id, or NULL (counted). Call with g_lock held. */
static sim_ctx *lookup(rknn_context id) {
    int slot = (int)(id & 0xff) - 1;
    if (slot < 0 || slot >= MAX_CTX || !g_ctx[slot].used || g_ctx[slot].generation != (uint32_t)(id >> 8)) {
        c_invalid_context_calls++;
        c_errors++;
        return NULL;
    }
    return &g_ctx[slot];
}

static int fail(int code) { c_errors++; return code; }

static int mask_limit(const char *platform) {
    if (strncmp(platform, "rk3588", 6) == 0) return 7;
    if (strncmp(platform, "rk3576", 6) == 0) return 3;
    return 0;
}

static int parse_header(const char *text, size_t len, sim_ctx *c) {
    if (len < 10 || strncmp(text, "RKNNSIM 1\n", 10) != 0) return -1;
    char platform[32] = "rk3588", fmt[16] = "nhwc", input[16] = "uint8";
    c->height = c->width = 448; c->tokens = 196; c->embed = 64; c->outputs = 1;
    const char *p = text + 10, *end = text + len;
    while (p < end && *p != '\n') {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        if (!nl) return -1;
        char line[128] = {0};
        size_t n = (size_t)(nl - p) < sizeof line - 1 ? (size_t)(nl - p) : sizeof line - 1;
        memcpy(line, p, n);
        int v;
        if (sscanf(line, "height=%d", &v) == 1) c->height = v;
        else if (sscanf(line, "width=%d", &v) == 1) c->width = v;
        else if (sscanf(line, "tokens=%d", &v) == 1) c->tokens = v;
        else if (sscanf(line, "embed=%d", &v) == 1) c->embed = v;
        else if (sscanf(line, "outputs=%d", &v) == 1) c->outputs = v;
        else if (sscanf(line, "fmt=%15s", fmt) == 1) {}
        else if (sscanf(line, "input=%15s", input) == 1) {}
        else if (sscanf(line, "platform=%31s", platform) == 1) {}
        p = nl + 1;
    }
    c->nchw = strcmp(fmt, "nchw") == 0;
    c->float_input = strcmp(input, "float32") == 0;
    c->max_mask = mask_limit(platform);
    int ok = c->height > 0 && c->height <= 4096 && c->width > 0 && c->width <= 4096 && c->tokens > 0 &&
             c->tokens <= 65536 && c->embed > 0 && c->embed <= 65536 && c->outputs > 0 && c->outputs <= MAX_OUT &&
             (c->nchw || strcmp(fmt, "nhwc") == 0) && (c->float_input || strcmp(input, "uint8") == 0);
    return ok ? 0 : -1;
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *buf = calloc(1, 4097);
    *len = buf ? fread(buf, 1, 4096, f) : 0;
    fclose(f);
    return buf;
}

int rknn_init(rknn_context *context, void *model, uint32_t size, uint32_t flag, void *extend) {
    (void)flag; (void)extend;
    if (!context || !model) return fail(RKNN_ERR_PARAM_INVALID);
    size_t len = size;
    char *text = size == 0 ? read_file((const char *)model, &len) : NULL;
    const char *data = size == 0 ? text : (const char *)model;
    sim_ctx parsed = {0};
    int bad = !data || parse_header(data, len, &parsed) != 0;
    free(text);
    pthread_mutex_lock(&g_lock);
    int slot = -1;
    for (int i = 0; i < MAX_CTX && !bad; i++) if (!g_ctx[i].used) { slot = i; break; }
    if (bad || slot < 0) {
        c_init_failures++;
        pthread_mutex_unlock(&g_lock);
        return fail(RKNN_ERR_MODEL_INVALID);
    }
    parsed.used = 1;
    parsed.generation = g_generation++ & 0xffffff;
    parsed.pixels = calloc((size_t)parsed.height * parsed.width * 3, sizeof(float));
    parsed.result = calloc((size_t)parsed.outputs * parsed.tokens * parsed.embed, sizeof(float));
    g_ctx[slot] = parsed;
    *context = make_id(slot, parsed.generation);
    c_inits++;
    c_live_contexts++;
    pthread_mutex_unlock(&g_lock);
    return RKNN_SUCC;
}

int rknn_set_core_mask(rknn_context context, int core_mask) {
    pthread_mutex_lock(&g_lock);
    sim_ctx *c = lookup(context);
    int rc = RKNN_SUCC;
    if (!c) rc = RKNN_ERR_CTX_INVALID;
    else if (s_fail_core_mask != 0) rc = fail(RKNN_ERR_FAIL);
    else if (core_mask < 0 || (core_mask & ~c->max_mask) != 0) rc = fail(RKNN_ERR_PARAM_INVALID);
    else { c_core_mask_sets++; c_last_core_mask = core_mask; }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

static void fill_attr(const sim_ctx *c, int output, uint32_t index, tensor_attr_t *a) {
    memset(a, 0, sizeof *a);
    a->index = index;
    a->scale = 1.0f;
    if (!output) {
        uint32_t h = (uint32_t)c->height, w = (uint32_t)c->width;
        uint32_t nhwc[4] = {1, h, w, 3}, nchw[4] = {1, 3, h, w};
        a->n_dims = 4;
        memcpy(a->dims, c->nchw ? nchw : nhwc, sizeof nhwc);
        a->fmt = c->nchw ? F_NCHW : F_NHWC;
        a->type = c->float_input ? T_FLOAT32 : T_FLOAT16;
        a->n_elems = h * w * 3;
        a->size = a->n_elems * (c->float_input ? 4 : 2);
        snprintf(a->name, MAX_NAME, "pixel_values");
    } else {
        a->n_dims = 3;
        a->dims[0] = 1; a->dims[1] = (uint32_t)c->tokens; a->dims[2] = (uint32_t)c->embed;
        a->fmt = F_UNDEFINED;
        a->type = T_FLOAT16;
        a->n_elems = (uint32_t)(c->tokens * c->embed);
        a->size = a->n_elems * 2;
        snprintf(a->name, MAX_NAME, "image_embeds_%u", index);
    }
    a->size_with_stride = a->size;
}

static int query_size(int cmd) {
    switch (cmd) {
    case Q_IN_OUT_NUM: return (int)sizeof(io_num_t);
    case Q_INPUT_ATTR: case Q_OUTPUT_ATTR: return (int)sizeof(tensor_attr_t);
    case Q_SDK_VERSION: return (int)sizeof(sdk_version_t);
    case Q_MEM_SIZE: return (int)sizeof(mem_size_t);
    case Q_CUSTOM_STRING: return (int)sizeof(custom_string_t);
    default: return -1;
    }
}

static int answer_query(const sim_ctx *c, int cmd, void *info) {
    if (cmd == Q_IN_OUT_NUM) {
        io_num_t *io = info;
        io->n_input = 1;
        io->n_output = (uint32_t)c->outputs;
    } else if (cmd == Q_INPUT_ATTR || cmd == Q_OUTPUT_ATTR) {
        uint32_t index = ((tensor_attr_t *)info)->index;
        if (index >= (cmd == Q_INPUT_ATTR ? 1u : (uint32_t)c->outputs)) return fail(RKNN_ERR_PARAM_INVALID);
        fill_attr(c, cmd == Q_OUTPUT_ATTR, index, info);
    } else if (cmd == Q_SDK_VERSION) {
        sdk_version_t *v = info;
        memset(v, 0, sizeof *v);
        snprintf(v->api_version, sizeof v->api_version, "2.3.2 (rknn simulator)");
        snprintf(v->drv_version, sizeof v->drv_version, "0.9.8 (simulated)");
    } else if (cmd == Q_MEM_SIZE) {
        mem_size_t *m = info;
        memset(m, 0, sizeof *m);
        m->total_internal_size = (uint32_t)(c->height * c->width * 3 * 4);
    } else {
        memset(info, 0, sizeof(custom_string_t));
    }
    return RKNN_SUCC;
}

int rknn_query(rknn_context context, int cmd, void *info, uint32_t size) {
    pthread_mutex_lock(&g_lock);
    sim_ctx *c = lookup(context);
    int rc = RKNN_ERR_CTX_INVALID, want = query_size(cmd);
    if (c && (want < 0 || !info)) rc = fail(RKNN_ERR_PARAM_INVALID);
    else if (c && size != (uint32_t)want) { c_struct_size_violations++; rc = fail(RKNN_ERR_PARAM_INVALID); }
    else if (c) rc = answer_query(c, cmd, info);
    pthread_mutex_unlock(&g_lock);
    return rc;
}

/* Copy one input into the context's HWC float pixels. Call with g_lock held. */
static void store_pixels(sim_ctx *c, const input_t *in) {
    size_t hw = (size_t)c->height * c->width;
    for (size_t i = 0; i < hw * 3; i++) {
        float v = c->float_input ? ((const float *)in->buf)[i] : ((const uint8_t *)in->buf)[i] / 255.0f;
        size_t pixel = c->nchw ? i % hw : i / 3, channel = c->nchw ? i / hw : i % 3;
        c->pixels[pixel * 3 + channel] = v;
    }
}

int rknn_inputs_set(rknn_context context, uint32_t n_inputs, input_t inputs[]) {
    pthread_mutex_lock(&g_lock);
    sim_ctx *c = lookup(context);
    int rc = RKNN_ERR_CTX_INVALID;
    if (c) {
        size_t elems = (size_t)c->height * c->width * 3;
        const input_t *in = inputs;
        int ok = n_inputs == 1 && in && in->index == 0 && in->buf && in->pass_through == 0 &&
                 in->fmt == (c->nchw ? F_NCHW : F_NHWC) && in->type == (c->float_input ? T_FLOAT32 : T_UINT8) &&
                 in->size == elems * (c->float_input ? 4 : 1);
        if (!ok) { c_input_violations++; rc = fail(RKNN_ERR_INPUT_INVALID); }
        else { store_pixels(c, in); c->input_set = 1; rc = RKNN_SUCC; }
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

static int grid_rows(int tokens) {
    int best = 1;
    for (int r = 1; (long)r * r <= tokens; r++) if (tokens % r == 0) best = r;
    return best;
}

/* The encoder: mean colour per region per token (see the top comment). */
static void encode(const sim_ctx *c, const float *pixels, float *result) {
    int gh = grid_rows(c->tokens), gw = c->tokens / gh;
    for (int t = 0; t < c->tokens; t++) {
        int r = t / gw, q = t % gw;
        int y0 = r * c->height / gh, y1 = (r + 1) * c->height / gh, x0 = q * c->width / gw, x1 = (q + 1) * c->width / gw;
        double sum[3] = {0, 0, 0};
        long n = 0;
        for (int y = y0; y < y1; y++)
            for (int x = x0; x < x1; x++, n++)
                for (int ch = 0; ch < 3; ch++) sum[ch] += pixels[((size_t)y * c->width + x) * 3 + ch];
        for (int j = 0; j < c->outputs; j++)
            for (int k = 0; k < c->embed; k++)
                result[((size_t)j * c->tokens + t) * c->embed + k] = (float)(n ? sum[k % 3] / n : 0) + (float)j;
    }
}

static void sleep_ms(double ms) {
    if (ms <= 0) return;
    long long ns = (long long)(ms * 1e6);
    struct timespec ts = {(time_t)(ns / 1000000000LL), (long)(ns % 1000000000LL)};
    nanosleep(&ts, NULL);
}

int rknn_run(rknn_context context, void *extend) {
    (void)extend;
    pthread_mutex_lock(&g_lock);
    sim_ctx *c = lookup(context);
    if (!c) { pthread_mutex_unlock(&g_lock); return RKNN_ERR_CTX_INVALID; }
    if (!c->input_set || s_fail_run != 0) { pthread_mutex_unlock(&g_lock); return fail(RKNN_ERR_FAIL); }
    if (c->running) c_concurrent_run_violations++;
    c->running++;
    c_runs++;
    if (++c_active_runs > c_max_active_runs) c_max_active_runs = c_active_runs;
    size_t n_pix = (size_t)c->height * c->width * 3, n_res = (size_t)c->outputs * c->tokens * c->embed;
    float *pixels = malloc(n_pix * sizeof(float)), *result = malloc(n_res * sizeof(float));
    if (pixels) memcpy(pixels, c->pixels, n_pix * sizeof(float));
    sim_ctx shape = *c;
    double delay = s_run_delay_ms;
    pthread_mutex_unlock(&g_lock);
    if (pixels && result) encode(&shape, pixels, result);
    sleep_ms(delay);
    pthread_mutex_lock(&g_lock);
    int rc = pixels && result ? RKNN_SUCC : fail(RKNN_ERR_FAIL);
    int slot = (int)(context & 0xff) - 1;  /* destroyed meanwhile (counted there): nothing to write back */
    c = g_ctx[slot].used && g_ctx[slot].generation == shape.generation ? &g_ctx[slot] : NULL;
    if (c && rc == RKNN_SUCC) { memcpy(c->result, result, n_res * sizeof(float)); c->has_result = 1; }
    if (c) c->running--;
    c_active_runs--;
    pthread_mutex_unlock(&g_lock);
    free(pixels);
    free(result);
    return rc;
}

static int outstanding(const sim_ctx *c) {
    int n = 0;
    for (int i = 0; i < MAX_OUT; i++) n += c->outstanding[i] != NULL;
    return n;
}

int rknn_outputs_get(rknn_context context, uint32_t n_outputs, output_t outputs[], void *extend) {
    (void)extend;
    pthread_mutex_lock(&g_lock);
    sim_ctx *c = lookup(context);
    int rc = RKNN_ERR_CTX_INVALID;
    if (c && (!c->has_result || s_fail_outputs_get != 0)) rc = fail(RKNN_ERR_FAIL);
    else if (c) {
        int ok = n_outputs == (uint32_t)c->outputs && outputs && outstanding(c) == 0;
        for (uint32_t i = 0; ok && i < n_outputs; i++)
            ok = outputs[i].index == i && outputs[i].want_float == 1 && outputs[i].is_prealloc == 0;
        if (!ok) { c_output_violations++; rc = fail(RKNN_ERR_OUTPUT_INVALID); }
        for (uint32_t i = 0; ok && i < n_outputs; i++) {
            size_t bytes = (size_t)c->tokens * c->embed * sizeof(float);
            outputs[i].buf = malloc(bytes);
            memcpy(outputs[i].buf, c->result + (size_t)i * c->tokens * c->embed, bytes);
            outputs[i].size = (uint32_t)bytes;
            c->outstanding[i] = outputs[i].buf;
            c_outputs_outstanding++;
        }
        if (ok) { c_outputs_gets++; rc = RKNN_SUCC; }
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

int rknn_outputs_release(rknn_context context, uint32_t n_outputs, output_t outputs[]) {
    pthread_mutex_lock(&g_lock);
    sim_ctx *c = lookup(context);
    int rc = c ? RKNN_SUCC : RKNN_ERR_CTX_INVALID;
    for (uint32_t i = 0; c && outputs && i < n_outputs; i++) {
        int found = -1;
        for (int k = 0; k < MAX_OUT; k++) if (outputs[i].buf && c->outstanding[k] == outputs[i].buf) found = k;
        if (found < 0) { c_output_violations++; rc = fail(RKNN_ERR_OUTPUT_INVALID); continue; }
        free(c->outstanding[found]);
        c->outstanding[found] = NULL;
        outputs[i].buf = NULL;
        c_outputs_outstanding--;
        c_outputs_released++;
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

int rknn_destroy(rknn_context context) {
    pthread_mutex_lock(&g_lock);
    sim_ctx *c = lookup(context);
    if (!c) { pthread_mutex_unlock(&g_lock); return RKNN_ERR_CTX_INVALID; }
    if (c->running) c_destroy_while_running++;
    for (int k = 0; k < MAX_OUT; k++) {
        if (!c->outstanding[k]) continue;
        free(c->outstanding[k]);
        c->outstanding[k] = NULL;
        c_outputs_outstanding--;
        c_outputs_leaked_at_destroy++;
    }
    free(c->pixels);
    free(c->result);
    memset(c, 0, sizeof *c);
    c_destroys++;
    c_live_contexts--;
    pthread_mutex_unlock(&g_lock);
    return RKNN_SUCC;
}

/* ---- control, for tests ---- */

long long rknn_sim_counter(const char *name) {
    long long v = -1;
    pthread_mutex_lock(&g_lock);
#define READ(n) if (strcmp(name, #n) == 0) v = c_##n;
    COUNTERS(READ)
    pthread_mutex_unlock(&g_lock);
    return v;
}

void rknn_sim_reset_counters(void) {
    pthread_mutex_lock(&g_lock);
    long long live = c_live_contexts, out = c_outputs_outstanding, active = c_active_runs;
#define ZERO(n) c_##n = 0;
    COUNTERS(ZERO)
    c_live_contexts = live;
    c_outputs_outstanding = out;
    c_active_runs = c_max_active_runs = active;
    pthread_mutex_unlock(&g_lock);
}

int rknn_sim_set(const char *key, double value) {
    double *slot = strcmp(key, "run_delay_ms") == 0       ? &s_run_delay_ms
                   : strcmp(key, "fail_core_mask") == 0   ? &s_fail_core_mask
                   : strcmp(key, "fail_run") == 0         ? &s_fail_run
                   : strcmp(key, "fail_outputs_get") == 0 ? &s_fail_outputs_get
                                                           : NULL;
    if (!slot) return -1;
    pthread_mutex_lock(&g_lock);
    *slot = value;
    pthread_mutex_unlock(&g_lock);
    return 0;
}
