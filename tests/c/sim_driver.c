/*
 * sim_driver.c - exercises the RKLLM simulator library through its C ABI, the way a binding does:
 * dlopen() the shared library, dlsym() every entry point, call it with the ABI structs.
 *
 *   cc -std=c11 -O1 -Wall -Wextra -pthread -DRKLLM_SIM_ABI=13 sim_driver.c -o drv13 -ldl
 *   ./drv13 ./libsim13.so [workdir]
 *
 * Prints one "ok - ..." or "FAIL - ..." line per check and exits non-zero if any check failed.
 */
#define _XOPEN_SOURCE 700
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define RKLLM_SIM_DECLARATIONS_ONLY
#include "../../rkllm_core/sim/rkllm_sim.c"

#if RKLLM_SIM_ABI >= 13
#define SIM_VERSION_STR "1.3.0"
#else
#define SIM_VERSION_STR "1.2.3"
#endif

/* ------------------------------------------------------------------ the loaded API ---- */
static struct {
    __typeof__(&rkllm_createDefaultParam) createDefaultParam;
    __typeof__(&rkllm_init) init;
    __typeof__(&rkllm_load_lora) load_lora;
    __typeof__(&rkllm_load_prompt_cache) load_prompt_cache;
    __typeof__(&rkllm_release_prompt_cache) release_prompt_cache;
    __typeof__(&rkllm_destroy) destroy;
    __typeof__(&rkllm_run) run;
    __typeof__(&rkllm_run_async) run_async;
    __typeof__(&rkllm_abort) abort_;
    __typeof__(&rkllm_is_running) is_running;
    __typeof__(&rkllm_clear_kv_cache) clear_kv_cache;
    __typeof__(&rkllm_get_kv_cache_size) get_kv_cache_size;
    __typeof__(&rkllm_set_chat_template) set_chat_template;
    __typeof__(&rkllm_set_function_tools) set_function_tools;
    __typeof__(&rkllm_set_cross_attn_params) set_cross_attn_params;
    __typeof__(&rkllm_sim_abi) sim_abi;
    __typeof__(&rkllm_sim_version) sim_version;
    __typeof__(&rkllm_sim_counter) counter;
    __typeof__(&rkllm_sim_reset_counters) reset_counters;
    __typeof__(&rkllm_sim_set) set;
    __typeof__(&rkllm_sim_trace_read) trace_read;
    __typeof__(&rkllm_sim_trace_clear) trace_clear;
} api;

static int failures, checks;
static char workdir[2048];

static void check(int cond, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void check(int cond, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("%s - ", cond ? "ok" : "FAIL");
    vprintf(fmt, ap);
    putchar('\n');
    va_end(ap);
    checks++;
    if (!cond) failures++;
}

static void check_str(const char *got, const char *want, const char *what) {
    int ok = got && strcmp(got, want) == 0;
    check(ok, "%s", what);
    if (!ok) printf("    got:  [%s]\n    want: [%s]\n", got ? got : "(null)", want);
}

static void msleep(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static char *path_in(const char *name) {
    static char bufs[8][4096];
    static int next;
    char *b = bufs[next++ % 8];
    snprintf(b, 4096, "%s/%s", workdir, name);
    return b;
}

static void write_file(const char *path, const char *content) {
    FILE *f = fopen(path, "wb");
    if (!f) {
        perror(path);
        exit(2);
    }
    fputs(content, f);
    fclose(f);
}

/* ------------------------------------------------------------ callback recording ---- */
typedef struct {
    pthread_mutex_t mu;
    char *text; /* NORMAL texts concatenated */
    size_t len;
    int normal, waiting, finish, error, waiting_null, waiting_empty, bad_utf8, finish_text_null;
    int same_thread, pause_after, hidden_tokens, hidden_size, normal_ret;
    float hidden_first[4]; /* element 0 of the first rows */
    double hidden_norm_err; /* max |norm - 1| over the rows */
    pthread_t caller;
    RKLLMPerfStat perf;
} rec_t;

static rec_t default_rec; /* result_userdata on 1.3 */

static void rec_reset(rec_t *r) {
    free(r->text);
    memset(r, 0, sizeof *r);
    pthread_mutex_init(&r->mu, NULL);
    r->caller = pthread_self();
}

/* True if s is complete, valid UTF-8 (no sequence cut at the end). */
static int utf8_complete(const char *s) {
    const unsigned char *u = (const unsigned char *)s;
    while (*u) {
        int n = *u < 0x80 ? 1 : (*u >> 5) == 6 ? 2 : (*u >> 4) == 14 ? 3 : (*u >> 3) == 30 ? 4 : 0;
        if (!n) return 0;
        for (int i = 1; i < n; i++)
            if ((u[i] & 0xC0) != 0x80) return 0;
        u += n;
    }
    return 1;
}

static int on_result(RKLLMResult *res, void *userdata, LLMCallState state) {
    rec_t *r = userdata;
    int ret = 0;
    pthread_mutex_lock(&r->mu);
    if (pthread_equal(pthread_self(), r->caller)) r->same_thread++;
    switch (state) {
    case RKLLM_RUN_NORMAL:
        r->normal++;
        if (res->last_hidden_layer.hidden_states) {
            const RKLLMResultLastHiddenLayer *hl = &res->last_hidden_layer;
            r->hidden_tokens = hl->num_tokens;
            r->hidden_size = hl->embd_size;
            for (int t = 0; t < hl->num_tokens; t++) {
                double sq = 0;
                for (int k = 0; k < hl->embd_size; k++)
                    sq += (double)hl->hidden_states[t * hl->embd_size + k] * hl->hidden_states[t * hl->embd_size + k];
                double err = sq > 1 ? sq - 1 : 1 - sq;
                if (err > r->hidden_norm_err) r->hidden_norm_err = err;
                if (t < 4) r->hidden_first[t] = hl->hidden_states[t * hl->embd_size];
            }
            ret = r->normal_ret;
        }
        if (res->text) {
            size_t n = strlen(res->text);
            if (!utf8_complete(res->text)) r->bad_utf8++;
            r->text = realloc(r->text, r->len + n + 1);
            memcpy(r->text + r->len, res->text, n + 1);
            r->len += n;
        }
        if (r->pause_after && r->normal == r->pause_after) ret = 1;
        break;
    case RKLLM_RUN_WAITING:
        r->waiting++;
        r->waiting_null += res->text == NULL;
        r->waiting_empty += res->text != NULL && res->text[0] == '\0';
        break;
    case RKLLM_RUN_FINISH:
        r->finish++;
        r->finish_text_null += res->text == NULL;
        r->perf = res->perf;
        break;
    case RKLLM_RUN_ERROR: r->error++; break;
    }
    pthread_mutex_unlock(&r->mu);
    return ret;
}

static void rec_free(rec_t *r) {
    free(r->text);
    r->text = NULL;
}

static const char *rec_text(rec_t *r) { return r->text ? r->text : ""; }

/* ------------------------------------------------------------------------ helpers ---- */
static LLMHandle make_handle(const char *model, int ctx, int max_new, int *rc_out) {
    RKLLMParam p = api.createDefaultParam();
    p.model_path = model;
    p.max_context_len = ctx;
    p.max_new_tokens = max_new;
    LLMHandle h = NULL;
#if RKLLM_SIM_ABI >= 13
    RKLLMCallback cb;
    memset(&cb, 0, sizeof cb);
    cb.result_callback = on_result;
    cb.result_userdata = &default_rec;
    int rc = api.init(&h, &p, &cb);
#else
    int rc = api.init(&h, &p, on_result);
#endif
    if (rc_out) *rc_out = rc;
    return h;
}

static RKLLMInput text_input(const char *prompt, const char *role, int thinking) {
    RKLLMInput in;
    memset(&in, 0, sizeof in);
    in.role = role;
    in.enable_thinking = thinking;
    in.input_type = RKLLM_INPUT_PROMPT;
    in.prompt_input = prompt;
    return in;
}

static RKLLMInferParam infer(int keep_history) {
    RKLLMInferParam ip;
    memset(&ip, 0, sizeof ip);
    ip.mode = RKLLM_INFER_GENERATE;
    ip.keep_history = keep_history;
    return ip;
}

/* Run a user prompt; the reply is recorded into r. */
static int ask(LLMHandle h, const char *prompt, int keep_history, rec_t *r) {
    RKLLMInput in = text_input(prompt, "user", 0);
    RKLLMInferParam ip = infer(keep_history);
    rec_reset(r);
    return api.run(h, &in, &ip, r);
}

static int kv_size(LLMHandle h) {
    int sizes[4] = {-7, -7, -7, -7};
    if (api.get_kv_cache_size(h, sizes) != 0) return -1;
    return sizes[0];
}

static long long C(const char *name) { return api.counter(name); }

/* Redirect stderr into a file for the duration of fn(); returns what was written. */
static char *capture_stderr(void (*fn)(void *), void *arg) {
    const char *p = path_in("stderr.txt");
    fflush(stderr);
    int saved = dup(2), fd = open(p, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(fd, 2);
    close(fd);
    fn(arg);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    static char buf[8192];
    FILE *f = fopen(p, "rb");
    size_t n = f ? fread(buf, 1, sizeof buf - 1, f) : 0;
    if (f) fclose(f);
    buf[n] = '\0';
    return buf;
}

static int wait_idle(LLMHandle h) {
#if RKLLM_SIM_ABI >= 13
    const int running = 1;
#else
    const int running = 0;
#endif
    for (int i = 0; i < 5000; i++) {
        if (api.is_running(h) != running) return 1;
        msleep(1);
    }
    return 0;
}

/* --------------------------------------------------------------------------- tests ---- */
static char model[4096], model2[4096];

/* Multimodal input: refused (and counted) when it breaks the contract; else images are prefilled and seen. */
static void test_multimodal(LLMHandle h, RKLLMInferParam *ip, rec_t *r) {
    float embed[2 * 10 * 3];
    for (int i = 0; i < 60; i++) embed[i] = (i % 3 == 2) ? 0.9f : 0.1f; /* every token blue */
    RKLLMInput mm;
    memset(&mm, 0, sizeof mm);
    mm.role = "user";
    mm.input_type = RKLLM_INPUT_MULTIMODAL;
    mm.multimodal_input.prompt = "<image>what?";
    SIM_MM_IMAGE(mm.multimodal_input).image_embed = embed;
    SIM_MM_IMAGE(mm.multimodal_input).n_image = 2;
    SIM_MM_IMAGE(mm.multimodal_input).n_image_tokens = 10;
    SIM_MM_IMAGE(mm.multimodal_input).image_width = SIM_MM_IMAGE(mm.multimodal_input).image_height = 4;
#if RKLLM_SIM_ABI >= 13
    mm.multimodal_input.image.image_start = "<s>";
    mm.multimodal_input.image.image_end = "</s>";
    mm.multimodal_input.image.image_content = "<c>";
#endif
    long long v0 = C("multimodal_violations");
    rec_reset(r);
    check(api.run(h, &mm, ip, r) != 0 && C("multimodal_violations") == v0 + 1,
          "multimodal: n_image != <image> tags is refused and counted");
    char *vision = path_in("vision-model.rkllm");
    write_file(vision, "RKLLMSIM 1\nhidden_size=3\n\n");
    RKLLMParam p = api.createDefaultParam();
    p.model_path = vision;
    p.max_context_len = 1024;
#if RKLLM_SIM_ABI == 12
    p.img_start = "<s>";
    p.img_end = "</s>";
    p.img_content = "<c>";
#endif
    LLMHandle vh = NULL;
#if RKLLM_SIM_ABI >= 13
    RKLLMCallback cb;
    memset(&cb, 0, sizeof cb);
    cb.result_callback = on_result;
    cb.result_userdata = &default_rec;
    check(api.init(&vh, &p, &cb) == 0, "vision model init");
#else
    check(api.init(&vh, &p, on_result) == 0, "vision model init");
#endif
    mm.multimodal_input.prompt = "<image><image>what?";
    rec_reset(r);
    check(api.run(vh, &mm, ip, r) == 0 && r->perf.prefill_tokens > 20, "multimodal: images count as prefill");
    check_str(rec_text(r), "I see images: a mostly blue image, a mostly blue image. Echo: <image><image>what? "
              "\xE2\x80\x94 ok.", "multimodal reply names the colour");
    check(C("multimodal_violations") == v0 + 1, "a valid multimodal input is no violation");
    api.destroy(vh);
}

static void test_basics(void) {
    check(api.sim_abi() == RKLLM_SIM_ABI, "rkllm_sim_abi() == %d", RKLLM_SIM_ABI);
    check_str(api.sim_version(), RKLLM_SIM_ABI >= 13 ? "1.3.0" : "1.2.3", "rkllm_sim_version()");
    RKLLMParam p = api.createDefaultParam();
    check(p.max_context_len == 512 && p.max_new_tokens == -1 && p.top_k == 1 && p.n_keep == -1 && p.top_p > 0.89f &&
              p.top_p < 0.91f && p.skip_special_token && !p.is_async && p.extend_param.enabled_cpus_num == 4 &&
              p.extend_param.n_batch == 1 && p.model_path == NULL,
          "createDefaultParam defaults");
    check(api.counter("no_such_counter") == -1, "unknown counter -> -1");
    check(api.set("no_such_key", 1) == -1, "unknown setting -> -1");
}

static void init_over_limit(void *arg) {
    (void)arg;
    int rc = 0;
    LLMHandle h = make_handle(model, 8192, -1, &rc);
    check(rc != 0 && h == NULL, "init: max_context above the model limit fails");
}

static void init_with_banner(void *arg) {
    int rc;
    api.set("banner", 1);
    *(LLMHandle *)arg = make_handle(model, 0, -1, &rc);
    api.set("banner", 0);
}

static void test_init_errors(void) {
    long long f0 = C("init_failures");
    int rc;
    RKLLMParam p = api.createDefaultParam();
    p.model_path = model;
#if RKLLM_SIM_ABI >= 13
    RKLLMCallback cb = {on_result, &default_rec, NULL, NULL, NULL, NULL};
    check(api.init(NULL, &p, &cb) != 0, "init: NULL handle pointer fails");
#else
    check(api.init(NULL, &p, on_result) != 0, "init: NULL handle pointer fails");
#endif
    LLMHandle h = make_handle(path_in("missing-ctx4096.rkllm"), 0, -1, &rc);
    check(rc != 0 && h == NULL, "init: missing model file fails");
    write_file(path_in("bad-ctx4096.rkllm"), "GGUFxxxxxxxxxxxx\n");
    h = make_handle(path_in("bad-ctx4096.rkllm"), 0, -1, &rc);
    check(rc != 0 && h == NULL, "init: bad magic fails");
    const char *err = capture_stderr(init_over_limit, NULL);
    check(strstr(err, "E rkllm: max_context[8192] must be less than the model's max_context_limit[4096]") != NULL,
          "init: over-limit message");
    check(C("init_failures") - f0 == 4, "init_failures counted (%lld)", C("init_failures") - f0);

    h = NULL;
    err = capture_stderr(init_with_banner, &h);
    check(h != NULL, "init: max_context_len 0 means the model limit");
    check(strstr(err, "I rkllm: rkllm-runtime version: " SIM_VERSION_STR " (simulator)") != NULL, "init: banner");
    check(api.destroy(h) == 0, "destroy");

    /* the limit from the header when the file name has no ctx */
    h = make_handle(model2, 300, -1, &rc);
    check(rc != 0, "init: header max_context=256 enforced");
    h = make_handle(model2, 256, -1, &rc);
    check(rc == 0, "init: header max_context=256 allows 256");
    api.destroy(h);
}

static void test_stream(void) {
    rec_t r = {0};
    LLMHandle h = make_handle(model, 1024, -1, NULL);
    const char *prompt = "h\xC3\xA9llo w\xC3\xB6rld \xF0\x9F\x98\x80";
    long long cb0 = C("callbacks"), g0 = C("generated_tokens"), p0 = C("prefilled_tokens");
    int rc = ask(h, prompt, 1, &r);
    check(rc == 0, "stream: rkllm_run returns 0");
    check_str(rec_text(&r), "Echo: h\xC3\xA9llo w\xC3\xB6rld \xF0\x9F\x98\x80 \xE2\x80\x94 ok.", "stream: echo reply");
    check(r.waiting > 0 && r.waiting_null == r.waiting, "stream: WAITING callbacks with text NULL (%d)", r.waiting);
    check(r.bad_utf8 == 0, "stream: every NORMAL text is complete UTF-8");
    check(r.finish == 1 && r.finish_text_null == 1 && r.error == 0, "stream: one FINISH with text NULL");
    check(r.same_thread == 0, "stream: callbacks come from another thread");
    check(r.perf.generate_tokens == r.normal + r.waiting, "stream: perf.generate_tokens (%d)", r.perf.generate_tokens);
    check(r.perf.prefill_tokens > 20 && r.perf.memory_usage_mb > 1.0f, "stream: perf prefill %d, memory %.2f",
          r.perf.prefill_tokens, r.perf.memory_usage_mb);
    check(C("callbacks") - cb0 == r.normal + r.waiting + 1, "stream: callbacks counter");
    check(C("generated_tokens") - g0 == r.perf.generate_tokens, "stream: generated_tokens counter");
    check(C("prefilled_tokens") - p0 == r.perf.prefill_tokens, "stream: prefilled_tokens counter");

    /* keep_history accounting */
    int kv1 = kv_size(h), pre1 = r.perf.prefill_tokens;
    check(kv1 == r.perf.prefill_tokens + r.perf.generate_tokens, "kv: size after run 1 = prefill + generated (%d)",
          kv1);
    ask(h, prompt, 1, &r);
    int kv2 = kv_size(h);
    check(kv2 == kv1 + r.perf.prefill_tokens + r.perf.generate_tokens, "kv: history accumulates (%d)", kv2);
    check(r.perf.prefill_tokens < pre1, "kv: second turn has no system part (%d < %d)", r.perf.prefill_tokens, pre1);
    int s[1] = {1}, e[1] = {3};
    check(api.clear_kv_cache(h, 0, s, e) == 0 && kv_size(h) == kv2 - 2, "kv: clear a token range");
    check(api.clear_kv_cache(h, 1, NULL, NULL) == 0, "kv: clear keeping the system prompt");
    int kvs = kv_size(h);
    check(kvs > 0 && kvs < pre1, "kv: only the system part is left (%d)", kvs);
    check(api.clear_kv_cache(h, 0, NULL, NULL) == 0 && kv_size(h) == 0, "kv: clear everything");
    ask(h, prompt, 0, &r);
    check(kv_size(h) == 0 && r.perf.prefill_tokens == pre1, "kv: keep_history=0 leaves the cache empty");

    /* WAITING text "" and raw split UTF-8 */
    api.set("waiting_text", 1);
    ask(h, prompt, 0, &r);
    check(r.waiting > 0 && r.waiting_empty == r.waiting, "waiting_text=1: WAITING text is \"\"");
    api.set("waiting_text", 0);
    api.set("split_utf8_normal", 1);
    ask(h, prompt, 0, &r);
    check(r.waiting == 0 && r.bad_utf8 > 0, "split_utf8_normal=1: no WAITING, partial bytes in NORMAL");
    check_str(rec_text(&r), "Echo: h\xC3\xA9llo w\xC3\xB6rld \xF0\x9F\x98\x80 \xE2\x80\x94 ok.", "split: bytes add up");
    api.set("split_utf8_normal", 0);

    /* thinking, count, custom template */
    RKLLMInput in = text_input("hi", "user", 1);
    RKLLMInferParam ip = infer(0);
    rec_reset(&r);
    api.run(h, &in, &ip, &r);
    check_str(rec_text(&r), "<think>\nThe user wrote 1 tokens.\n</think>\n\nEcho: hi \xE2\x80\x94 ok.",
              "thinking reply");
    ask(h, "Please count to 12.", 0, &r);
    check_str(rec_text(&r), "1 2 3 4 5 6 7 8 9 10 11 12", "count to N");
    check(api.set_chat_template(h, "SYS", "<u>", "</u>") == 0, "set_chat_template");
    rec_reset(&r);
    api.run(h, &in, &ip, &r);
    check_str(rec_text(&r), "Echo: hi \xE2\x80\x94 ok.", "custom template disables thinking");
    check(r.perf.prefill_tokens == 9, "custom template prefill = tokens of SYS<u>hi</u> (%d)", r.perf.prefill_tokens);

    /* token, multimodal and hidden-state inputs */
    int32_t ids[3] = {1, 2, 3};
    RKLLMInput tin;
    memset(&tin, 0, sizeof tin);
    tin.role = "user";
    tin.input_type = RKLLM_INPUT_TOKEN;
    tin.token_input.input_ids = ids;
    tin.token_input.n_tokens = 3;
    rec_reset(&r);
    check(api.run(h, &tin, &ip, &r) == 0 && r.perf.prefill_tokens == 3, "token input: prefill = n_tokens");
    check_str(rec_text(&r), "Echo: <3 tokens> \xE2\x80\x94 ok.", "token input reply");
    test_multimodal(h, &ip, &r);
    RKLLMInferParam hp = infer(0);
    hp.mode = RKLLM_INFER_GET_LAST_HIDDEN_LAYER;
    rec_reset(&r);
    check(api.run(h, &tin, &hp, &r) == 0 && r.hidden_tokens == 3 && r.hidden_size == 256 && r.finish == 1,
          "hidden-layer mode: one buffer of n_tokens rows");
    check(r.hidden_norm_err < 1e-4 && r.hidden_first[0] != r.hidden_first[1], "hidden rows: unit norm, per id");
    check(r.perf.prefill_tokens == 3, "hidden-layer mode: FINISH with prefill = n_tokens");
    float first = r.hidden_first[0];
    ids[0] = 4;
    rec_reset(&r);
    r.normal_ret = 2; /* 1.3: "release the buffer early"; no meaning on 1.2: either way the run goes on */
    check(api.run(h, &tin, &hp, &r) == 0 && r.normal == 1 && r.finish == 1 && r.hidden_first[0] != first,
          "hidden-layer mode: callback returning 2 continues to FINISH; rows follow the ids");
    check(api.set_chat_template(h, "", "", "") == 0, "empty chat template");
    RKLLMInput sin = text_input("<|im_start|>hi<|im_end|>", "user", 0);
    rec_reset(&r);
    rc = api.run(h, &sin, &hp, &r);
    check(rc == 0 && r.hidden_tokens == 3, "special tokens are one token each (%d rows)", r.hidden_tokens);
    api.destroy(h);
    rec_free(&r);
}

static void test_roles_and_errors(void) {
    rec_t r = {0};
    LLMHandle h = make_handle(model, 1024, -1, NULL);
    RKLLMInput in = text_input("hello", "assistant", 0);
    RKLLMInferParam ip = infer(0);
    long long e0 = C("errors");
    rec_reset(&r);
    check(api.run(h, &in, &ip, &r) == -1 && r.normal + r.finish == 0, "role other than user/tool -> -1");
    check(C("errors") - e0 == 1, "errors counted for a failed run");
    in = text_input("{\"temp\": 20}", "tool", 0);
    rec_reset(&r);
    api.run(h, &in, &ip, &r);
    check_str(rec_text(&r), "Tool result: {\"temp\": 20}", "role tool reply");

    int rc = ask(h, "please [[sim:error]] now", 0, &r);
    check(rc == -1 && r.error == 1 && r.finish == 0 && r.normal + r.waiting == 2,
          "[[sim:error]]: ERROR after 2 tokens");
    api.set("error_after_tokens", 0);
    rc = ask(h, "hello", 0, &r);
    check(rc == -1 && r.error == 1 && r.normal == 0, "error_after_tokens=0: ERROR before any token");
    rc = ask(h, "hello", 0, &r);
    check(rc == 0 && r.error == 0 && r.finish == 1, "error_after_tokens is one-shot");
    api.destroy(h);

    /* max_new_tokens from init, and the 1.3 per-run override */
    h = make_handle(model, 1024, 3, NULL);
    ask(h, "count to 100", 0, &r);
    check(r.normal + r.waiting == 3 && r.perf.generate_tokens == 3 && r.finish == 1, "max_new_tokens=3 at init");
#if RKLLM_SIM_ABI >= 13
    in = text_input("count to 100", "user", 0);
    ip.max_new_tokens = 5;
    rec_reset(&r);
    api.run(h, &in, &ip, &r);
    check(r.perf.generate_tokens == 5, "1.3: RKLLMInferParam.max_new_tokens overrides init");
    ip.max_new_tokens = 0;
    /* userdata NULL -> result_userdata */
    rec_reset(&default_rec);
    api.run(h, &in, &ip, NULL);
    check(default_rec.finish == 1, "1.3: NULL userdata falls back to result_userdata");
#endif
    api.destroy(h);

    /* context limits */
    h = make_handle(model, 32, -1, NULL);
    rc = ask(h, "this prompt is far too long for a context of thirty-two tokens, really", 1, &r);
    check(rc == -1 && r.error == 1 && kv_size(h) == 0, "prompt longer than the context -> ERROR, -1");
    api.destroy(h);
    h = make_handle(model, 200, -1, NULL);
    long long sh0 = C("context_shifts");
    int over = 0;
    for (int i = 0; i < 8; i++) {
        ask(h, "hi again", 1, &r);
        over += kv_size(h) > 200;
    }
    check(C("context_shifts") > sh0 && over == 0, "context shift keeps the cache within max_context_len");
    api.destroy(h);
    rec_free(&r);
}

typedef struct {
    LLMHandle h;
    int delay_ms, running_seen;
} aborter_t;

static void *aborter(void *arg) {
    aborter_t *a = arg;
    msleep(a->delay_ms);
    a->running_seen = api.is_running(a->h);
    api.abort_(a->h);
    return NULL;
}

static void test_abort_pause(void) {
    rec_t r = {0};
    LLMHandle h = make_handle(model, 4096, -1, NULL);
    api.set("token_delay_ms", 2);
    long long a0 = C("aborts");
    check(api.abort_(h) == 0 && C("aborts") == a0, "abort while idle returns 0, not counted");
    aborter_t a = {h, 40, -1};
    pthread_t t;
    pthread_create(&t, NULL, aborter, &a);
    int rc = ask(h, "count to 3000", 1, &r);
    pthread_join(t, NULL);
    check(rc == 0, "abort: rkllm_run returns 0");
    check(r.finish == 0 && r.normal > 0 && r.normal < 1000, "abort: stopped early without FINISH (%d tokens)",
          r.normal);
    check(C("aborts") - a0 == 1, "abort counted");
    check(a.running_seen == (RKLLM_SIM_ABI >= 13 ? 1 : 0), "is_running while running (ABI convention)");
    check(api.is_running(h) == (RKLLM_SIM_ABI >= 13 ? 0 : 1), "is_running after the run (ABI convention)");
    check(kv_size(h) > 0, "abort with keep_history=1 keeps the cache");
    api.set("finish_after_abort", 1);
    pthread_create(&t, NULL, aborter, &a);
    ask(h, "count to 3000", 0, &r);
    pthread_join(t, NULL);
    check(r.finish == 1, "finish_after_abort=1 sends FINISH");
    api.set("finish_after_abort", 0);
    api.set("token_delay_ms", 0);

    long long p0 = C("pauses");
    rec_reset(&r);
    r.pause_after = 3;
    RKLLMInput in = text_input("count to 50", "user", 0);
    RKLLMInferParam ip = infer(0);
    rc = api.run(h, &in, &ip, &r);
    check(rc == 0 && r.normal == 3 && r.finish == 0 && C("pauses") - p0 == 1, "pause: callback returning 1 stops");
    check(kv_size(h) > 0, "pause keeps the KV cache even with keep_history=0");
    api.destroy(h);
    rec_free(&r);
}

static void test_concurrency(void) {
    rec_t r1 = {0}, r2 = {0}, r3 = {0};
    LLMHandle h1 = make_handle(model, 1024, -1, NULL), h2 = make_handle(model, 1024, -1, NULL);
    check(h1 != h2, "two handles");
    api.reset_counters();
    api.set("token_delay_ms", 1);
    RKLLMInput in = text_input("count to 40", "user", 0);
    RKLLMInferParam ip = infer(0);
    rec_reset(&r1);
    rec_reset(&r2);
    check(api.run_async(h1, &in, &ip, &r1) == 0 && api.run_async(h2, &in, &ip, &r2) == 0, "run_async on two handles");
    rec_reset(&r3);
    check(api.run(h1, &in, &ip, &r3) == -1 && C("concurrent_run_violations") == 1, "second run on a busy handle -> -1");
    check(api.destroy(h1) == -1 && C("destroy_while_running") == 1, "destroy while running -> -1");
    check(wait_idle(h1) && wait_idle(h2), "async runs end");
    check(r1.finish == 1 && r2.finish == 1 && r3.normal == 0, "both async runs finished");
    check_str(rec_text(&r1), rec_text(&r2), "same prompt, same reply");
    check(C("max_active_runs") >= 2 && C("runs") == 2 && C("active_runs") == 0, "max_active_runs >= 2");
    check(C("busy_ns") > 0, "busy_ns measured");
    api.set("token_delay_ms", 0);
    check(api.destroy(h1) == 0 && api.destroy(h2) == 0, "destroy after the runs");
    rec_free(&r1);
    rec_free(&r2);
    rec_free(&r3);
}

static void test_tools_and_schema(void) {
    rec_t r = {0};
    LLMHandle h = make_handle(model, 4096, -1, NULL);
    const char *tools =
        "[{\"type\":\"function\",\"function\":{\"name\":\"magic_function\",\"description\":\"d\","
        "\"parameters\":{\"type\":\"object\",\"properties\":{\"input\":{\"type\":\"integer\"}},\"required\":[\"input\"]"
        "}}},"
        "{\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"parameters\":{\"type\":\"object\","
        "\"properties\":{\"city\":{\"type\":\"string\"},\"days\":{\"type\":\"integer\"},"
        "\"unit\":{\"enum\":[\"celsius\",\"fahrenheit\"]}},\"required\":[\"city\",\"days\"]}}}]";
    check(api.set_function_tools(h, "not json", "{\"a\":1}", NULL) == -1, "set_function_tools rejects a non-array");
    check(api.set_function_tools(h, "You are a tool bot.", tools, "tool_response") == 0, "set_function_tools");
    ask(h, "Please call magic_function(3) now.", 0, &r);
    check_str(rec_text(&r), "<tool_call>\n{\"name\": \"magic_function\", \"arguments\": {\"input\": 3}}\n</tool_call>",
              "tool call with positional args");
    ask(h, "What is get_weather in Paris for 5 days?", 0, &r);
    check_str(
        rec_text(&r),
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"What is get_weather\", \"days\": 5}}\n"
        "</tool_call>",
        "tool call with generated args");
    ask(h, "Use two tools: get_weather('Paris', 2) and magic_function(7)", 0, &r);
    check_str(
        rec_text(&r),
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 2}}\n</tool_call>\n"
        "<tool_call>\n{\"name\": \"magic_function\", \"arguments\": {\"input\": 7}}\n</tool_call>",
        "two tool calls");
    ask(h, "Tell me a joke", 0, &r);
    check_str(rec_text(&r), "Echo: Tell me a joke \xE2\x80\x94 ok.", "no tool named -> echo");
    ask(h,
        "Describe a cat. JSON schema: {\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"string\"},"
        "\"age\":{\"type\":\"integer\"},\"weight\":{\"type\":\"number\"},\"tags\":{\"type\":\"array\"},"
        "\"indoor\":{\"type\":\"boolean\"},\"kind\":{\"enum\":[\"tabby\",\"calico\"]},"
        "\"owner\":{\"type\":\"object\",\"properties\":{\"first\":{\"type\":\"string\"}}}},\"required\":[\"name\"]}",
        0, &r);
    check_str(rec_text(&r),
              "{\"name\": \"Describe a cat.\", \"age\": 42, \"weight\": 42.0, \"tags\": [], \"indoor\": true, "
              "\"kind\": \"tabby\", \"owner\": {\"first\": \"Describe a cat.\"}}",
              "JSON-schema reply");
    api.destroy(h);
    rec_free(&r);
}

static void test_prompt_cache_and_lora(void) {
    rec_t r = {0};
    LLMHandle h = make_handle(model, 4096, -1, NULL);
    const char *pc = path_in("cache.pc");
    unlink(pc);
    RKLLMPromptCacheParam pcp = {1, pc};
    RKLLMInput in = text_input("Summarise the following text please", "user", 0);
    RKLLMInferParam ip = infer(0);
    ip.prompt_cache_params = &pcp;
    long long s0 = C("prompt_cache_saves");
    rec_reset(&r);
    check(api.run(h, &in, &ip, &r) == 0 && C("prompt_cache_saves") - s0 == 1, "prompt cache saved");
    int full = r.perf.prefill_tokens;
    struct stat st;
    check(stat(pc, &st) == 0 && st.st_size > 20, "prompt cache file written");
    check(api.load_prompt_cache(h, path_in("nope.pc")) == -1, "load a missing prompt cache -> -1");
    write_file(path_in("junk.pc"), "garbage\n");
    check(api.load_prompt_cache(h, path_in("junk.pc")) == -1, "load a bad prompt cache -> -1");
    LLMHandle other = make_handle(model2, 0, -1, NULL);
    check(api.load_prompt_cache(other, pc) == -1, "load a prompt cache of another model -> -1");
    api.destroy(other);
    check(api.load_prompt_cache(h, pc) == 0, "load the prompt cache");
    long long hit0 = C("prompt_cache_hit_tokens");
    in = text_input("Summarise the following text please, in French", "user", 0);
    ip = infer(1);
    rec_reset(&r);
    api.run(h, &in, &ip, &r);
    long long hit = C("prompt_cache_hit_tokens") - hit0;
    check(hit > 10 && r.perf.prefill_tokens < full, "prompt cache hit skips prefill (hit %lld, prefill %d)", hit,
          r.perf.prefill_tokens);
    check(kv_size(h) == r.perf.prefill_tokens + hit + r.perf.generate_tokens, "kv holds the cached prefix too");
    check(api.release_prompt_cache(h) == 0 && C("prompt_cache_releases") >= 1, "release the prompt cache");

    /* LoRA */
    check(api.load_lora(h, &(RKLLMLoraAdapter){path_in("missing.lora"), "x", 1.0f}) == -1, "load a missing LoRA -> -1");
    write_file(path_in("adapter.lora"), "lora");
    check(api.load_lora(h, &(RKLLMLoraAdapter){path_in("adapter.lora"), "myl", 1.0f}) == 0, "load a LoRA");
    RKLLMLoraParam lp = {"myl"};
    in = text_input("hey", "user", 0);
    ip = infer(0);
    ip.lora_params = &lp;
    rec_reset(&r);
    api.run(h, &in, &ip, &r);
    check_str(rec_text(&r), "[lora:myl] Echo: hey \xE2\x80\x94 ok.", "LoRA prefix in the reply");
    lp.lora_adapter_name = "unknown";
    check(api.run(h, &in, &ip, &r) == -1, "run with an unloaded LoRA -> -1");
    check(api.set_cross_attn_params(h, NULL) == 0, "set_cross_attn_params accepted");
    api.destroy(h);
    rec_free(&r);
}

static void test_invalid_handles(void) {
    LLMHandle h = make_handle(model, 0, -1, NULL);
    long long live = C("live_handles");
    check(api.destroy(h) == 0 && C("live_handles") == live - 1, "destroy decrements live_handles");
    long long i0 = C("invalid_handle_calls");
    RKLLMInput in = text_input("x", "user", 0);
    RKLLMInferParam ip = infer(0);
    int sizes[1];
    int bad = 0;
    LLMHandle handles[3] = {h, NULL, (LLMHandle)(uintptr_t)0x1234};
    for (int k = 0; k < 3; k++) {
        LLMHandle x = handles[k];
        bad += api.run(x, &in, &ip, NULL) == -1;
        bad += api.run_async(x, &in, &ip, NULL) == -1;
        bad += api.abort_(x) == -1;
        bad += api.is_running(x) == -1;
        bad += api.get_kv_cache_size(x, sizes) == -1;
        bad += api.clear_kv_cache(x, 1, NULL, NULL) == -1;
        bad += api.set_chat_template(x, "a", "b", "c") == -1;
        bad += api.load_prompt_cache(x, "y") == -1;
        bad += api.destroy(x) == -1;
    }
    check(bad == 27, "every call on a destroyed/NULL/garbage handle returns -1 (%d/27)", bad);
    check(C("invalid_handle_calls") - i0 == 27, "invalid_handle_calls counted");
    LLMHandle h2 = make_handle(model, 0, -1, NULL);
    check(h2 != h, "handle values are not reused");
    api.destroy(h2);
    api.reset_counters();
    check(C("runs") == 0 && C("live_handles") == live - 1, "reset_counters keeps live_handles");
}

static void test_trace(void) {
    rec_t r = {0};
    LLMHandle h = make_handle(model, 0, -1, NULL);
    api.set("trace", 1);
    api.trace_clear();
    api.set_chat_template(h, "say \"hi\"\n\x01", NULL, "\xC3\xA9");
    RKLLMInput in = text_input("tab\there", "user", 0);
    RKLLMInferParam ip = infer(0);
#if RKLLM_SIM_ABI >= 13
    RKLLMSamplingParam sp = {7, 0.5f, 0.25f, 1.0f, 0, 0, 0, 5.0f, 0.1f};
    ip.sampling_params = &sp;
    ip.max_new_tokens = 2;
#endif
    rec_reset(&r);
    api.run(h, &in, &ip, &r);
    api.set("trace", 0);
    size_t n = api.trace_read(NULL, 0);
    char *buf = calloc(n + 1, 1);
    check(api.trace_read(buf, n) == n && n > 0 && buf[n - 1] == '\n', "trace: read, newline terminated");
    check(strstr(buf, "{\"fn\":\"rkllm_set_chat_template\"") != NULL, "trace: set_chat_template line");
    check(strstr(buf, "\"system_prompt\":\"say \\\"hi\\\"\\n\\u0001\",\"prompt_prefix\":null,"
                      "\"prompt_postfix\":\"\xC3\xA9\"") != NULL,
          "trace: strings escaped, NULL as null");
    check(strstr(buf, "{\"fn\":\"rkllm_run\"") != NULL && strstr(buf, "\"prompt\":\"tab\\there\"") != NULL &&
              strstr(buf, "\"keep_history\":0") != NULL && strstr(buf, "\"lora\":null") != NULL &&
              strstr(buf, "\"prompt_cache\":null") != NULL,
          "trace: run line");
#if RKLLM_SIM_ABI >= 13
    check(strstr(buf, "\"max_new_tokens\":2,\"sampling\":{\"top_k\":7,\"top_p\":0.5,\"temperature\":0.25") != NULL,
          "trace: 1.3 sampling params");
    check(r.perf.generate_tokens == 2, "1.3 per-run max_new_tokens");
#endif
    int lines = 0;
    for (char *p = buf; *p; p++) lines += *p == '\n';
    check(lines == 2, "trace: one line per call (%d)", lines);
    free(buf);
    api.trace_clear();
    check(api.trace_read(NULL, 0) == 0, "trace_clear");
    api.destroy(h);
    rec_free(&r);
}

/* ---------------------------------------------------------------------------- main ---- */
int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s LIBRARY [WORKDIR]\n", argv[0]);
        return 2;
    }
    void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr, "dlopen: %s\n", dlerror());
        return 2;
    }
#define LOAD(field, sym) \
    do { \
        *(void **)&api.field = dlsym(lib, sym); \
        if (!api.field) { \
            fprintf(stderr, "missing symbol %s\n", sym); \
            return 2; \
        } \
    } while (0)
    LOAD(createDefaultParam, "rkllm_createDefaultParam");
    LOAD(init, "rkllm_init");
    LOAD(load_lora, "rkllm_load_lora");
    LOAD(load_prompt_cache, "rkllm_load_prompt_cache");
    LOAD(release_prompt_cache, "rkllm_release_prompt_cache");
    LOAD(destroy, "rkllm_destroy");
    LOAD(run, "rkllm_run");
    LOAD(run_async, "rkllm_run_async");
    LOAD(abort_, "rkllm_abort");
    LOAD(is_running, "rkllm_is_running");
    LOAD(clear_kv_cache, "rkllm_clear_kv_cache");
    LOAD(get_kv_cache_size, "rkllm_get_kv_cache_size");
    LOAD(set_chat_template, "rkllm_set_chat_template");
    LOAD(set_function_tools, "rkllm_set_function_tools");
    LOAD(set_cross_attn_params, "rkllm_set_cross_attn_params");
    LOAD(sim_abi, "rkllm_sim_abi");
    LOAD(sim_version, "rkllm_sim_version");
    LOAD(counter, "rkllm_sim_counter");
    LOAD(reset_counters, "rkllm_sim_reset_counters");
    LOAD(set, "rkllm_sim_set");
    LOAD(trace_read, "rkllm_sim_trace_read");
    LOAD(trace_clear, "rkllm_sim_trace_clear");

    if (argc >= 3)
        snprintf(workdir, sizeof workdir, "%s", argv[2]);
    else {
        char tmpl[] = "/tmp/rkllm_sim_driver.XXXXXX";
        if (!mkdtemp(tmpl)) {
            perror("mkdtemp");
            return 2;
        }
        snprintf(workdir, sizeof workdir, "%s", tmpl);
    }
    snprintf(model, sizeof model, "%s/Qwen3-0.6B-w8a8-ctx4096.rkllm", workdir);
    write_file(model, "RKLLMSIM 1\nfamily=qwen3\nthink=1\nmemory_mb=700\n\npadding...");
    snprintf(model2, sizeof model2, "%s/small-model.rkllm", workdir);
    write_file(model2, "RKLLMSIM 1\nmax_context=256\n");
    api.set("banner", 0);
    rec_reset(&default_rec);

    test_basics();
    test_init_errors();
    test_stream();
    test_roles_and_errors();
    test_abort_pause();
    test_concurrency();
    test_tools_and_schema();
    test_prompt_cache_and_lora();
    test_invalid_handles();
    test_trace();
    check(C("live_handles") == 0 && C("active_runs") == 0, "no handles or runs left");

    rec_free(&default_rec);
    printf("%d checks, %d failed (ABI %d)\n", checks, failures, RKLLM_SIM_ABI);
    return failures ? 1 : 0;
}
