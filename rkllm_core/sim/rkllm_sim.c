/*
 * rkllm_sim.c - a CPU-only simulator of Rockchip's RKLLM runtime (librkllmrt.so).
 *
 * It exports the same C ABI as the real runtime so that the Python binding can run its real ctypes
 * code path on a machine without an NPU. Nothing here is derived from the vendor's implementation:
 * the behaviour follows the public header and the runtime's documented behaviour, and
 * the "model" is a tiny text file (see read_model()) whose replies are deterministic functions of the
 * prompt, so that tests can match answers to questions.
 *
 * Build (one library per ABI):
 *   gcc -std=c11 -O2 -Wall -Wextra -Werror -shared -fPIC -pthread -DRKLLM_SIM_ABI=13 rkllm_sim.c -o libsim13.so
 *   gcc -std=c11 -O2 -Wall -Wextra -Werror -shared -fPIC -pthread -DRKLLM_SIM_ABI=12 rkllm_sim.c -o libsim12.so
 *
 * Defining RKLLM_SIM_DECLARATIONS_ONLY before including this file yields only the ABI types and the
 * prototypes (the C test driver uses this).
 *
 * Model file: a first line "RKLLMSIM 1", then key=value lines (max_context, memory_mb, family, think,
 * yes_token, no_token, hidden_size) up to an empty line; only the first 4 KiB are read. The context limit is ctx<N>
 * in the file name, else max_context, else 4096. yes_token=<id> and no_token=<id> (both, distinct, in
 * [0, 151936)) make the model a reranker for RKLLM_INFER_GET_LOGITS (see below).
 * Replies (first match wins): "[[sim:error]]" -> ERROR after 2 tokens; a declared tool named in a user
 * prompt (or, when none is, a tool whose name has a word the prompt uses, e.g. "weather" for
 * get_weather, unless the prompt carries a <tool_response>) -> <tool_call> block(s); "JSON schema: {...}"
 * -> an instance of the schema; "count to N" -> "1 2 ... N"; role "tool" -> "Tool result: <prompt>";
 * otherwise "Echo: <prompt> \u2014 ok.". Generated string values are the prompt's first quoted text,
 * else its first three words. Replies stream in 4-byte tokens; a token ending inside a UTF-8 character
 * is sent as WAITING.
 *
 * Choices where the real runtime is undocumented:
 *  - rkllm_createDefaultParam(): max_context_len 512, max_new_tokens -1, top_k 1, n_keep -1, top_p 0.9,
 *    temperature 0.8, repeat_penalty 1.1, frequency/presence penalty 0, mirostat 0, tau 5.0, eta 0.1,
 *    skip_special_token true, ignore_eos_token false (1.3), is_async false, extend_param zeroed except
 *    enabled_cpus_num 4 and n_batch 1.
 *  - A NULL callback (1.2) or NULL RKLLMCallback* / result_callback (1.3) is an init error.
 *  - A NULL RKLLMInput.role is treated as "user".
 *  - With a custom chat template the turn is prefix + prompt + postfix for both roles.
 *  - "inits" counts successful inits; "errors" counts each failed run once (input validation, unknown
 *    LoRA, prompt longer than the context, ERROR callbacks), not invalid handles or concurrent runs.
 *  - Env vars RKLLM_SIM_* are applied at every rkllm_init (when set); rkllm_sim_set() after that wins.
 *  - The trace buffer is capped at 32 MiB; lines that do not fit are dropped and counted in the
 *    extra counter "trace_dropped". With trace >= 2 every run also records a "prefilled" line: the KV
 *    cache's text once its input is prefilled, i.e. what the answer is conditioned on.
 *  - rkllm_clear_kv_cache() while the handle is running returns -1.
 *  - Multimodal input (RKLLM_INPUT_MULTIMODAL): n_image must equal the "<image>" tags in the prompt, and
 *    with images the embedding pointer, n_image_tokens, image_width/height and the tags (RKLLMParam at
 *    init on 1.2, image.* per run on 1.3; content non-empty) must be set, and the model file must declare
 *    hidden_size=<W>: the run reads n_image * n_image_tokens * W floats. A violation is counted in
 *    "multimodal_violations" and the run fails (-1). The reply starts "I see a mostly <colour> image. "
 *    (one clause per image), the colour named from the mean of each token row's first three values;
 *    image tokens count as prefilled tokens.
 *  - With RKLLM_SIM_REPORT=<path> the counters are written to <path> as JSON when the library is
 *    unloaded (at process exit).
 *  - After an ERROR the KV cache follows keep_history like a normal run.
 *  - rkllm_sim_reset_counters() sets max_active_runs to the current active_runs (not 0).
 *  - "resident_handles" counts the models in memory: from the start of an rkllm_init (a real one
 *    allocates while it loads) to the end of its rkllm_destroy, or of the init that failed;
 *    "max_resident_handles" is its peak (reset to the current value, like max_active_runs).
 *  - Modes GET_LAST_HIDDEN_LAYER / GET_LOGITS: prefill (with the chat template, as for generation),
 *    then one NORMAL callback carrying the buffer, then FINISH. The buffer is freed once the callback
 *    returns; on 1.3 a callback returning 2 ("release the buffer early") just continues the run.
 *
 * Batched runs (extend_param.n_batch = N > 1; the runtime's documented contract, SDK manual 3.2.14):
 *  - rkllm_run takes an array of N RKLLMInput (the ABI's stride) and one RKLLMInferParam for all of them;
 *    every slot must hold a valid input (an empty slot is not documented: the run is refused, -1).
 *  - Each slot has its own KV cache. rkllm_get_kv_cache_size fills N ints; rkllm_clear_kv_cache's start/end
 *    arrays have one entry per slot (a slot whose start >= end follows keep_system_prompt).
 *  - Refused (-1, counted in "errors" and "batch_refusals", no callback), being undocumented for batches:
 *    keep_history = 1 (whether a slot keeps its own conversation is not documented), modes other than
 *    generation, saving a prompt cache. N above 100 is an init error (the runtime's documented range).
 *  - The slots are prefilled one after another (each costs what a single run's prefill costs). Then every
 *    step calls back once with an array of N RKLLMResult (stride sizeof(RKLLMResult)): an active slot's next
 *    token (token_id >= 0; text NULL, or "" with waiting_text, while it holds back an incomplete UTF-8
 *    character, unless split_utf8_normal), a finished slot's token_id -1 with text NULL. The state is
 *    WAITING when every slot of the step holds back, else NORMAL. A slot finishes at the end of its reply,
 *    at max_new_tokens or when its cache is full; the run returns when every slot has finished.
 *  - Cost model (an assumption, setting batch_step_cost, default 0.15): a step costs
 *    token_delay_ms * (1 + batch_step_cost * (active slots - 1)); finished slots cost nothing.
 *  - The FINISH shape is not documented; setting batch_finish chooses it: 0 (default) an array of N results,
 *    token_id -1, each with its slot's perf; 1 a single result with the run's totals, followed in memory by
 *    poison results (token_id > 0, text "[[sim:poison]]") that a binding reading an array would deliver;
 *    2 no FINISH callback (the return is the end). ERROR uses shape 0 or 1 likewise.
 *  - rkllm_abort stops the whole run. A one-shot error_after_tokens or a "[[sim:error]]" prompt in any slot
 *    fails the whole run (ERROR, -1). Counters: "batched_runs", "batch_steps" (step callbacks), "batch_refusals".
 *
 * Tokens: a special token "<|name|>" (name: 1-64 ASCII letters, digits, '_') is one token; otherwise
 * a run of up to 4 ASCII alphanumerics (with an optional single leading space), else one UTF-8 code
 * point. A token's id is a hash of its bytes. Words: maximal runs of ASCII letters/digits and bytes
 * >= 0x80 outside special tokens, compared ASCII-case-folded; about 35 English function words ("the",
 * "is", "how", "many", ...) are not words to the embedding and reranker models (no weight, as in
 * trained models).
 *
 * The simulated embedding model (GET_LAST_HIDDEN_LAYER): num_tokens rows (one per input token, this
 * turn's prefill) of embd_size 256. Every unit has a pseudo-random +-1 vector derived from a hash
 * (a word: its case-folded bytes; token input: the id). Row t is the L2-normalised sum of the vectors
 * of the units within the first t+1 tokens: for text, every word that ends within them (counted as
 * often as it occurs; a row with no complete word yet uses the vector of its token's id); for token
 * input, ids 0..t. Embedding and image rows add nothing. So the last row is a bag-of-words embedding.
 *
 * The simulated reranker (GET_LOGITS on a model with yes_token/no_token): the logits of the last
 * position (num_tokens 1, vocab_size 151936) are 0 except logit[yes] = 8 * overlap - 4 and
 * logit[no] = -logit[yes], read from the KV cache's text the way a Qwen3-Reranker prompt is laid out:
 * the query is the text after the last "<Query>:" up to the next "\n<Document>:" (or the end), the
 * document the text after the last "<Document>:" up to the next "<|" (or the end), and overlap =
 * |distinct query words that occur in the document| / |distinct query words| (0 without query words).
 * Other models: logit 10 at the id of the reply's first 4 bytes, 0 elsewhere.
 */
#ifndef RKLLM_SIM_DECLARATIONS_ONLY
#define _XOPEN_SOURCE 700
#endif

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifndef RKLLM_SIM_ABI
#define RKLLM_SIM_ABI 13
#endif
#if RKLLM_SIM_ABI != 12 && RKLLM_SIM_ABI != 13
#error "RKLLM_SIM_ABI must be 12 or 13"
#endif

#define SIM_API __attribute__((visibility("default")))

/* ========================================================================================= */
/* ABI declarations (written from the public header's field list; layouts asserted below)     */
/* ========================================================================================= */

typedef void *LLMHandle;

typedef enum {
    RKLLM_RUN_NORMAL = 0,
    RKLLM_RUN_WAITING = 1,
    RKLLM_RUN_FINISH = 2,
    RKLLM_RUN_ERROR = 3,
} LLMCallState;

typedef enum {
    RKLLM_INPUT_PROMPT = 0,
    RKLLM_INPUT_TOKEN = 1,
    RKLLM_INPUT_EMBED = 2,
    RKLLM_INPUT_MULTIMODAL = 3,
} RKLLMInputType;

typedef enum {
    RKLLM_INFER_GENERATE = 0,
    RKLLM_INFER_GET_LAST_HIDDEN_LAYER = 1,
    RKLLM_INFER_GET_LOGITS = 2,
} RKLLMInferMode;

#if RKLLM_SIM_ABI >= 13
typedef int (*LLMGetEmbedCallback)(void *userdata, int32_t *tokens, uint64_t num_tokens, void *embed, uint64_t len);
typedef int (*LLMTokenizerCallback)(void *userdata, const char *text, int32_t text_len, int32_t *tokens,
                                    int32_t n_tokens_max);
#endif

typedef struct {
    int32_t base_domain_id;
    int8_t embed_flash;
    int8_t enabled_cpus_num;
    uint32_t enabled_cpus_mask;
    uint8_t n_batch;
    int8_t use_cross_attn;
    uint8_t reserved[104];
} RKLLMExtendParam;

typedef struct {
    const char *model_path;
    int32_t max_context_len;
    int32_t max_new_tokens;
    int32_t top_k;
    int32_t n_keep;
    float top_p;
    float temperature;
    float repeat_penalty;
    float frequency_penalty;
    float presence_penalty;
    int32_t mirostat;
    float mirostat_tau;
    float mirostat_eta;
    bool skip_special_token;
#if RKLLM_SIM_ABI >= 13
    bool ignore_eos_token;
#endif
    bool is_async;
#if RKLLM_SIM_ABI == 12
    const char *img_start;
    const char *img_end;
    const char *img_content;
#endif
    RKLLMExtendParam extend_param;
} RKLLMParam;

typedef struct {
    const char *lora_adapter_path;
    const char *lora_adapter_name;
    float scale;
} RKLLMLoraAdapter;

typedef struct {
    float *embed;
    size_t n_tokens;
} RKLLMEmbedInput;

typedef struct {
    int32_t *input_ids;
    size_t n_tokens;
} RKLLMTokenInput;

#if RKLLM_SIM_ABI >= 13
typedef struct {
    char *prompt;
    struct {
        float *image_embed;
        size_t n_image_tokens;
        size_t n_image;
        const char *image_start;
        const char *image_end;
        const char *image_content;
        size_t image_width;
        size_t image_height;
    } image;
    struct {
        float *video_embed;
        size_t n_frame_tokens;
        size_t n_frame_per_video;
        size_t n_video;
        const char *video_start;
        const char *video_end;
        const char *video_content;
        size_t frame_width;
        size_t frame_height;
    } video;
} RKLLMMultiModalInput;
#define SIM_MM_IMAGE(mm) ((mm).image)
#else
typedef struct {
    char *prompt;
    float *image_embed;
    size_t n_image_tokens;
    size_t n_image;
    size_t image_width;
    size_t image_height;
} RKLLMMultiModalInput;
#define SIM_MM_IMAGE(mm) (mm)
#endif

typedef struct {
    const char *role;
    bool enable_thinking;
    RKLLMInputType input_type;
    union {
        const char *prompt_input;
        RKLLMEmbedInput embed_input;
        RKLLMTokenInput token_input;
        RKLLMMultiModalInput multimodal_input;
    };
} RKLLMInput;

typedef struct {
    const char *lora_adapter_name;
} RKLLMLoraParam;

typedef struct {
    int save_prompt_cache;
    const char *prompt_cache_path;
} RKLLMPromptCacheParam;

typedef struct {
    float *encoder_k_cache;
    float *encoder_v_cache;
    float *encoder_mask;
    int32_t *encoder_pos;
    int num_tokens;
} RKLLMCrossAttnParam;

#if RKLLM_SIM_ABI >= 13
typedef struct {
    int32_t top_k;
    float top_p;
    float temperature;
    float repeat_penalty;
    float frequency_penalty;
    float presence_penalty;
    int32_t mirostat;
    float mirostat_tau;
    float mirostat_eta;
} RKLLMSamplingParam;
#endif

typedef struct {
    RKLLMInferMode mode;
    RKLLMLoraParam *lora_params;
    RKLLMPromptCacheParam *prompt_cache_params;
#if RKLLM_SIM_ABI >= 13
    RKLLMSamplingParam *sampling_params;
#endif
    int keep_history;
#if RKLLM_SIM_ABI >= 13
    int32_t max_new_tokens;
#endif
} RKLLMInferParam;

typedef struct {
    const float *hidden_states;
    int embd_size;
    int num_tokens;
} RKLLMResultLastHiddenLayer;

typedef struct {
    const float *logits;
    int vocab_size;
    int num_tokens;
} RKLLMResultLogits;

typedef struct {
    float prefill_time_ms;
    int prefill_tokens;
    float generate_time_ms;
    int generate_tokens;
    float memory_usage_mb;
} RKLLMPerfStat;

typedef struct {
    const char *text;
    int32_t token_id;
    RKLLMResultLastHiddenLayer last_hidden_layer;
    RKLLMResultLogits logits;
    RKLLMPerfStat perf;
} RKLLMResult;

typedef int (*LLMResultCallback)(RKLLMResult *result, void *userdata, LLMCallState state);

#if RKLLM_SIM_ABI >= 13
typedef struct {
    LLMResultCallback result_callback;
    void *result_userdata;
    LLMTokenizerCallback tokenizer_callback;
    void *tokenizer_userdata;
    LLMGetEmbedCallback embed_callback;
    void *embed_userdata;
} RKLLMCallback;
#endif

/* ---- exported functions: the runtime's API ---- */
SIM_API RKLLMParam rkllm_createDefaultParam(void);
#if RKLLM_SIM_ABI >= 13
SIM_API int rkllm_init(LLMHandle *handle, RKLLMParam *param, RKLLMCallback *callback);
#else
SIM_API int rkllm_init(LLMHandle *handle, RKLLMParam *param, LLMResultCallback callback);
#endif
SIM_API int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter *lora_adapter);
SIM_API int rkllm_load_prompt_cache(LLMHandle handle, const char *prompt_cache_path);
SIM_API int rkllm_release_prompt_cache(LLMHandle handle);
SIM_API int rkllm_destroy(LLMHandle handle);
SIM_API int rkllm_run(LLMHandle handle, RKLLMInput *rkllm_input, RKLLMInferParam *rkllm_infer_params, void *userdata);
SIM_API int rkllm_run_async(LLMHandle handle, RKLLMInput *rkllm_input, RKLLMInferParam *rkllm_infer_params,
                            void *userdata);
SIM_API int rkllm_abort(LLMHandle handle);
SIM_API int rkllm_is_running(LLMHandle handle);
SIM_API int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int *start_pos, int *end_pos);
SIM_API int rkllm_get_kv_cache_size(LLMHandle handle, int *cache_sizes);
SIM_API int rkllm_set_chat_template(LLMHandle handle, const char *system_prompt, const char *prompt_prefix,
                                    const char *prompt_postfix);
SIM_API int rkllm_set_function_tools(LLMHandle handle, const char *system_prompt, const char *tools,
                                     const char *tool_response_str);
SIM_API int rkllm_set_cross_attn_params(LLMHandle handle, RKLLMCrossAttnParam *cross_attn_params);

/* ---- exported functions: simulator controls ---- */
SIM_API int rkllm_sim_abi(void);
SIM_API const char *rkllm_sim_version(void);
SIM_API long long rkllm_sim_counter(const char *name);
SIM_API void rkllm_sim_reset_counters(void);
SIM_API int rkllm_sim_set(const char *key, double value);
SIM_API size_t rkllm_sim_trace_read(char *buf, size_t cap);
SIM_API void rkllm_sim_trace_clear(void);

/* ---- LP64 layout checks (numbers from tests/data/layout-*-lp64.json) ---- */
#if UINTPTR_MAX == 0xffffffffffffffff
#define SIM_SIZE(T, n) _Static_assert(sizeof(T) == (n), "sizeof " #T)
#define SIM_OFF(T, f, n) _Static_assert(offsetof(T, f) == (n), "offsetof " #T "." #f)
SIM_SIZE(RKLLMExtendParam, 120);
SIM_OFF(RKLLMExtendParam, base_domain_id, 0); SIM_OFF(RKLLMExtendParam, embed_flash, 4);
SIM_OFF(RKLLMExtendParam, enabled_cpus_num, 5); SIM_OFF(RKLLMExtendParam, enabled_cpus_mask, 8);
SIM_OFF(RKLLMExtendParam, n_batch, 12); SIM_OFF(RKLLMExtendParam, use_cross_attn, 13);
SIM_OFF(RKLLMExtendParam, reserved, 14);
SIM_OFF(RKLLMParam, model_path, 0); SIM_OFF(RKLLMParam, max_context_len, 8);
SIM_OFF(RKLLMParam, max_new_tokens, 12); SIM_OFF(RKLLMParam, top_k, 16); SIM_OFF(RKLLMParam, n_keep, 20);
SIM_OFF(RKLLMParam, top_p, 24); SIM_OFF(RKLLMParam, temperature, 28); SIM_OFF(RKLLMParam, repeat_penalty, 32);
SIM_OFF(RKLLMParam, frequency_penalty, 36); SIM_OFF(RKLLMParam, presence_penalty, 40);
SIM_OFF(RKLLMParam, mirostat, 44); SIM_OFF(RKLLMParam, mirostat_tau, 48); SIM_OFF(RKLLMParam, mirostat_eta, 52);
SIM_OFF(RKLLMParam, skip_special_token, 56);
SIM_SIZE(RKLLMLoraAdapter, 24);
SIM_OFF(RKLLMLoraAdapter, lora_adapter_path, 0); SIM_OFF(RKLLMLoraAdapter, lora_adapter_name, 8);
SIM_OFF(RKLLMLoraAdapter, scale, 16);
SIM_SIZE(RKLLMEmbedInput, 16); SIM_OFF(RKLLMEmbedInput, embed, 0); SIM_OFF(RKLLMEmbedInput, n_tokens, 8);
SIM_SIZE(RKLLMTokenInput, 16); SIM_OFF(RKLLMTokenInput, input_ids, 0); SIM_OFF(RKLLMTokenInput, n_tokens, 8);
SIM_OFF(RKLLMInput, role, 0); SIM_OFF(RKLLMInput, enable_thinking, 8); SIM_OFF(RKLLMInput, input_type, 12);
SIM_OFF(RKLLMInput, prompt_input, 16); SIM_OFF(RKLLMInput, embed_input, 16);
SIM_OFF(RKLLMInput, token_input, 16); SIM_OFF(RKLLMInput, multimodal_input, 16);
SIM_SIZE(RKLLMLoraParam, 8); SIM_OFF(RKLLMLoraParam, lora_adapter_name, 0);
SIM_SIZE(RKLLMPromptCacheParam, 16);
SIM_OFF(RKLLMPromptCacheParam, save_prompt_cache, 0); SIM_OFF(RKLLMPromptCacheParam, prompt_cache_path, 8);
SIM_SIZE(RKLLMCrossAttnParam, 40);
SIM_OFF(RKLLMCrossAttnParam, encoder_k_cache, 0); SIM_OFF(RKLLMCrossAttnParam, encoder_v_cache, 8);
SIM_OFF(RKLLMCrossAttnParam, encoder_mask, 16); SIM_OFF(RKLLMCrossAttnParam, encoder_pos, 24);
SIM_OFF(RKLLMCrossAttnParam, num_tokens, 32);
SIM_OFF(RKLLMInferParam, mode, 0); SIM_OFF(RKLLMInferParam, lora_params, 8);
SIM_OFF(RKLLMInferParam, prompt_cache_params, 16);
SIM_SIZE(RKLLMResultLastHiddenLayer, 16); SIM_OFF(RKLLMResultLastHiddenLayer, hidden_states, 0);
SIM_OFF(RKLLMResultLastHiddenLayer, embd_size, 8); SIM_OFF(RKLLMResultLastHiddenLayer, num_tokens, 12);
SIM_SIZE(RKLLMResultLogits, 16); SIM_OFF(RKLLMResultLogits, logits, 0);
SIM_OFF(RKLLMResultLogits, vocab_size, 8); SIM_OFF(RKLLMResultLogits, num_tokens, 12);
SIM_SIZE(RKLLMPerfStat, 20); SIM_OFF(RKLLMPerfStat, prefill_time_ms, 0); SIM_OFF(RKLLMPerfStat, prefill_tokens, 4);
SIM_OFF(RKLLMPerfStat, generate_time_ms, 8); SIM_OFF(RKLLMPerfStat, generate_tokens, 12);
SIM_OFF(RKLLMPerfStat, memory_usage_mb, 16);
SIM_SIZE(RKLLMResult, 72); SIM_OFF(RKLLMResult, text, 0); SIM_OFF(RKLLMResult, token_id, 8);
SIM_OFF(RKLLMResult, last_hidden_layer, 16); SIM_OFF(RKLLMResult, logits, 32); SIM_OFF(RKLLMResult, perf, 48);
#if RKLLM_SIM_ABI >= 13
SIM_SIZE(RKLLMParam, 184);
SIM_OFF(RKLLMParam, ignore_eos_token, 57); SIM_OFF(RKLLMParam, is_async, 58); SIM_OFF(RKLLMParam, extend_param, 60);
SIM_SIZE(RKLLMMultiModalInput, 144);
SIM_OFF(RKLLMMultiModalInput, prompt, 0); SIM_OFF(RKLLMMultiModalInput, image, 8);
SIM_OFF(RKLLMMultiModalInput, image.image_embed, 8); SIM_OFF(RKLLMMultiModalInput, image.n_image_tokens, 16);
SIM_OFF(RKLLMMultiModalInput, image.n_image, 24); SIM_OFF(RKLLMMultiModalInput, image.image_start, 32);
SIM_OFF(RKLLMMultiModalInput, image.image_end, 40); SIM_OFF(RKLLMMultiModalInput, image.image_content, 48);
SIM_OFF(RKLLMMultiModalInput, image.image_width, 56); SIM_OFF(RKLLMMultiModalInput, image.image_height, 64);
SIM_OFF(RKLLMMultiModalInput, video, 72); SIM_OFF(RKLLMMultiModalInput, video.video_embed, 72);
SIM_OFF(RKLLMMultiModalInput, video.n_frame_tokens, 80); SIM_OFF(RKLLMMultiModalInput, video.n_frame_per_video, 88);
SIM_OFF(RKLLMMultiModalInput, video.n_video, 96); SIM_OFF(RKLLMMultiModalInput, video.video_start, 104);
SIM_OFF(RKLLMMultiModalInput, video.video_end, 112); SIM_OFF(RKLLMMultiModalInput, video.video_content, 120);
SIM_OFF(RKLLMMultiModalInput, video.frame_width, 128); SIM_OFF(RKLLMMultiModalInput, video.frame_height, 136);
SIM_SIZE(RKLLMInput, 160);
SIM_SIZE(RKLLMSamplingParam, 36);
SIM_OFF(RKLLMSamplingParam, top_k, 0); SIM_OFF(RKLLMSamplingParam, top_p, 4);
SIM_OFF(RKLLMSamplingParam, temperature, 8); SIM_OFF(RKLLMSamplingParam, repeat_penalty, 12);
SIM_OFF(RKLLMSamplingParam, frequency_penalty, 16); SIM_OFF(RKLLMSamplingParam, presence_penalty, 20);
SIM_OFF(RKLLMSamplingParam, mirostat, 24); SIM_OFF(RKLLMSamplingParam, mirostat_tau, 28);
SIM_OFF(RKLLMSamplingParam, mirostat_eta, 32);
SIM_SIZE(RKLLMInferParam, 40);
SIM_OFF(RKLLMInferParam, sampling_params, 24); SIM_OFF(RKLLMInferParam, keep_history, 32);
SIM_OFF(RKLLMInferParam, max_new_tokens, 36);
SIM_SIZE(RKLLMCallback, 48);
SIM_OFF(RKLLMCallback, result_callback, 0); SIM_OFF(RKLLMCallback, result_userdata, 8);
SIM_OFF(RKLLMCallback, tokenizer_callback, 16); SIM_OFF(RKLLMCallback, tokenizer_userdata, 24);
SIM_OFF(RKLLMCallback, embed_callback, 32); SIM_OFF(RKLLMCallback, embed_userdata, 40);
#else
SIM_SIZE(RKLLMParam, 208);
SIM_OFF(RKLLMParam, is_async, 57); SIM_OFF(RKLLMParam, img_start, 64); SIM_OFF(RKLLMParam, img_end, 72);
SIM_OFF(RKLLMParam, img_content, 80); SIM_OFF(RKLLMParam, extend_param, 88);
SIM_SIZE(RKLLMMultiModalInput, 48);
SIM_OFF(RKLLMMultiModalInput, prompt, 0); SIM_OFF(RKLLMMultiModalInput, image_embed, 8);
SIM_OFF(RKLLMMultiModalInput, n_image_tokens, 16); SIM_OFF(RKLLMMultiModalInput, n_image, 24);
SIM_OFF(RKLLMMultiModalInput, image_width, 32); SIM_OFF(RKLLMMultiModalInput, image_height, 40);
SIM_SIZE(RKLLMInput, 64);
SIM_SIZE(RKLLMInferParam, 32); SIM_OFF(RKLLMInferParam, keep_history, 24);
#endif
#undef SIM_SIZE
#undef SIM_OFF
#endif /* LP64 */

#ifndef RKLLM_SIM_DECLARATIONS_ONLY
/* ========================================================================================= */
/* Implementation                                                                            */
/* ========================================================================================= */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#if RKLLM_SIM_ABI >= 13
#define SIM_VERSION "1.3.0"
#else
#define SIM_VERSION "1.2.3"
#endif

#define SIM_VOCAB 151936u
#define SIM_HANDLE_BASE ((uintptr_t)0x10000)
#define SIM_TRACE_CAP ((size_t)32 << 20)
#define SIM_DEFAULT_SYSTEM "You are a helpful assistant."
#define SIM_HIDDEN_SIZE 256
#define SIM_MAX_BATCH 100
#define SIM_POISON "[[sim:poison]]"
#define JSON_MAX_DEPTH 64

/* ---------------------------------------------------------------- small utilities ---- */

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) {
        fputs("E rkllm: simulator out of memory\n", stderr);
        abort();
    }
    return p;
}

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) {
        fputs("E rkllm: simulator out of memory\n", stderr);
        abort();
    }
    return q;
}

static char *xstrndup(const char *s, size_t n) {
    char *d = xmalloc(n + 1);
    memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

static char *xstrdup(const char *s) { return s ? xstrndup(s, strlen(s)) : NULL; }

static void sim_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void sim_log(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("E rkllm: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void sleep_ns(int64_t ns) {
    if (ns <= 0) return;
    struct timespec ts = {(time_t)(ns / 1000000000LL), (long)(ns % 1000000000LL)};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {}
}

static void sleep_ms(double ms) {
    if (ms > 0) sleep_ns((int64_t)(ms * 1e6));
}

static bool is_alnum_ascii(unsigned char c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

static bool is_digit(char c) { return c >= '0' && c <= '9'; }

static char lower_ascii(char c) { return (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c; }

/* Case-insensitive (ASCII) substring search. */
static const char *ci_find(const char *hay, const char *needle) {
    size_t n = strlen(needle);
    for (; *hay; hay++) {
        size_t i = 0;
        while (i < n && hay[i] && lower_ascii(hay[i]) == lower_ascii(needle[i])) i++;
        if (i == n) return hay;
    }
    return NULL;
}

/* ---- growable byte buffer, always NUL-terminated once used ---- */
typedef struct {
    char *p;
    size_t n, cap;
} sbuf;

static void sb_add(sbuf *b, const void *data, size_t n) {
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->n + n + 1) cap *= 2;
        b->p = xrealloc(b->p, cap);
        b->cap = cap;
    }
    if (n) memcpy(b->p + b->n, data, n);
    b->n += n;
    b->p[b->n] = '\0';
}

static void sb_adds(sbuf *b, const char *s) { sb_add(b, s, strlen(s)); }

static void sb_addf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_addf(sbuf *b, const char *fmt, ...) {
    char tmp[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n < sizeof tmp) {
        sb_add(b, tmp, (size_t)n);
        return;
    }
    char *big = xmalloc((size_t)n + 1);
    va_start(ap, fmt);
    vsnprintf(big, (size_t)n + 1, fmt, ap);
    va_end(ap);
    sb_add(b, big, (size_t)n);
    free(big);
}

/* Hand the buffer's string to the caller (never NULL) and reset the buffer. */
static char *sb_take(sbuf *b) {
    char *s = b->p ? b->p : xstrdup("");
    b->p = NULL;
    b->n = b->cap = 0;
    return s;
}

static void sb_free(sbuf *b) {
    free(b->p);
    b->p = NULL;
    b->n = b->cap = 0;
}

/* ---------------------------------------------------------------------- UTF-8 ---- */

/* Length of the valid UTF-8 sequence starting at s (n bytes available), or 0 if invalid. */
static size_t utf8_valid_len(const unsigned char *s, size_t n) {
    unsigned char c = s[0];
    size_t len;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF)
        len = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else
        return 0;
    if (n < len || s[1] < lo || s[1] > hi) return 0;
    for (size_t i = 2; i < len; i++)
        if (s[i] < 0x80 || s[i] > 0xBF) return 0;
    return len;
}

/* True if the bytes end in the middle of a multi-byte sequence. */
static bool utf8_incomplete_tail(const char *s, size_t n) {
    for (size_t back = 1; back <= 3 && back <= n; back++) {
        unsigned char c = (unsigned char)s[n - back];
        if ((c & 0xC0) == 0x80) continue; /* continuation byte: keep looking for the lead */
        size_t need = (c >= 0xF8) ? 1 : (c >= 0xF0) ? 4 : (c >= 0xE0) ? 3 : (c >= 0xC0) ? 2 : 1;
        return need > back;
    }
    return false;
}

static void put_utf8(sbuf *b, unsigned cp) {
    unsigned char o[4];
    size_t n;
    if (cp < 0x80) {
        o[0] = (unsigned char)cp;
        n = 1;
    } else if (cp < 0x800) {
        o[0] = (unsigned char)(0xC0 | (cp >> 6));
        o[1] = (unsigned char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        o[0] = (unsigned char)(0xE0 | (cp >> 12));
        o[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (unsigned char)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        o[0] = (unsigned char)(0xF0 | (cp >> 18));
        o[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
        o[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        o[3] = (unsigned char)(0x80 | (cp & 0x3F));
        n = 4;
    }
    sb_add(b, o, n);
}

/* Append s as a JSON string literal (or null). Invalid UTF-8 bytes become U+FFFD. */
static void json_escape(sbuf *b, const char *s) {
    if (!s) {
        sb_adds(b, "null");
        return;
    }
    const unsigned char *u = (const unsigned char *)s;
    size_t n = strlen(s), i = 0;
    sb_add(b, "\"", 1);
    while (i < n) {
        unsigned char c = u[i];
        if (c == '"' || c == '\\') {
            char e[2] = {'\\', (char)c};
            sb_add(b, e, 2);
            i++;
        } else if (c < 0x20) {
            const char *e = c == '\n'   ? "\\n"
                            : c == '\r' ? "\\r"
                            : c == '\t' ? "\\t"
                            : c == '\b' ? "\\b"
                            : c == '\f' ? "\\f"
                                        : NULL;
            if (e)
                sb_adds(b, e);
            else
                sb_addf(b, "\\u%04x", c);
            i++;
        } else {
            size_t l = utf8_valid_len(u + i, n - i);
            if (l == 0) {
                sb_adds(b, "\\ufffd");
                i++;
            } else {
                sb_add(b, u + i, l);
                i += l;
            }
        }
    }
    sb_add(b, "\"", 1);
}

/* ------------------------------------------------------------------ tokenizer ---- */
/* Length of the special token "<|name|>" at s (name: 1-64 ASCII letters, digits or '_'), else 0. */
static size_t special_len(const char *s, size_t n) {
    if (n < 5 || s[0] != '<' || s[1] != '|') return 0;
    size_t i = 2;
    while (i < n && i - 2 < 64 && (is_alnum_ascii((unsigned char)s[i]) || s[i] == '_')) i++;
    return (i > 2 && i + 2 <= n && s[i] == '|' && s[i + 1] == '>') ? i + 2 : 0;
}

/* A token is a special token "<|name|>", or a run of up to 4 ASCII alphanumerics (with an optional
 * single leading space), or else exactly one UTF-8 code point (an invalid byte counts as one token). */
static size_t tok_next(const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    size_t sp = special_len(s, n);
    if (sp) return sp;
    size_t i = (u[0] == ' ' && n > 1 && is_alnum_ascii(u[1])) ? 1 : 0;
    if (is_alnum_ascii(u[i])) {
        size_t j = i;
        while (j < n && j - i < 4 && is_alnum_ascii(u[j])) j++;
        return j;
    }
    size_t l = utf8_valid_len(u, n);
    return l ? l : 1;
}

static size_t count_tokens(const char *s) {
    size_t n = s ? strlen(s) : 0, i = 0, count = 0;
    while (i < n) {
        i += tok_next(s + i, n - i);
        count++;
    }
    return count;
}

/* Split s[0..n) into tokens; *lens receives each token's byte length. Returns the token count. */
static size_t tokenize(const char *s, size_t n, int **lens) {
    size_t cap = n / 2 + 1, count = 0, i = 0;
    *lens = xmalloc(cap * sizeof **lens);
    while (i < n) {
        size_t l = tok_next(s + i, n - i);
        if (count == cap) *lens = xrealloc(*lens, (cap *= 2) * sizeof **lens);
        (*lens)[count++] = (int)l;
        i += l;
    }
    return count;
}

/* FNV-1a 32 of the token's bytes, folded into the vocabulary. */
static int32_t token_id_of(const char *s, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 16777619u;
    }
    return (int32_t)(h % SIM_VOCAB);
}

/* ---------------------------------------------------------------------- words ---- */
/* A word is a maximal run of ASCII letters/digits and bytes >= 0x80 (so UTF-8 letters count) outside
 * special tokens; words compare ASCII-case-folded. */
typedef struct {
    size_t start, len;
} sim_span;

static bool is_word_byte(unsigned char c) { return is_alnum_ascii(c) || c >= 0x80; }

/* The words of s[0..n) in order; *out receives them (free it). Returns the count. */
/* English function words carry little meaning: the simulated embedding and reranker models, like
 * trained ones, give them no weight. */
static bool is_function_word(const char *s, size_t n) {
    static const char *const words[] = {"a",    "an",    "and",  "are", "as",   "at",   "be",    "by",   "can",
                                        "do",   "does",  "for",  "from", "has", "have", "how",   "in",   "is",
                                        "it",   "its",   "of",   "on",   "or",  "that", "the",   "this", "to",
                                        "was",  "what",  "which", "who", "with", "many", "much", "there", "their"};
    if (n > 5) return false;
    for (size_t k = 0; k < sizeof words / sizeof *words; k++) {
        size_t len = strlen(words[k]);
        if (len != n) continue;
        size_t i = 0;
        while (i < n && lower_ascii(s[i]) == words[k][i]) i++;
        if (i == n) return true;
    }
    return false;
}

static size_t find_words(const char *s, size_t n, sim_span **out) {
    size_t cap = 16, count = 0, i = 0;
    *out = xmalloc(cap * sizeof **out);
    while (i < n) {
        size_t sp = special_len(s + i, n - i);
        if (sp) {
            i += sp;
            continue;
        }
        if (!is_word_byte((unsigned char)s[i])) {
            i++;
            continue;
        }
        size_t j = i;
        while (j < n && is_word_byte((unsigned char)s[j])) j++; /* '<' of a special token ends it */
        if (is_function_word(s + i, j - i)) {
            i = j;
            continue;
        }
        if (count == cap) *out = xrealloc(*out, (cap *= 2) * sizeof **out);
        (*out)[count].start = i;
        (*out)[count++].len = j - i;
        i = j;
    }
    return count;
}

/* FNV-1a 64 of the case-folded word: the key of its vector. */
static uint64_t word_key(const char *s, size_t n) {
    uint64_t h = 14695981039346656037ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)lower_ascii(s[i]);
        h *= 1099511628211ull;
    }
    return h;
}

static uint64_t mix64(uint64_t x) { /* the splitmix64 finaliser */
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* The key of a token id's vector (a different domain from word keys). */
static uint64_t id_key(int32_t id) { return mix64((uint64_t)(uint32_t)id ^ 0x1d5eed0000000000ull); }

/* Add the unit's pseudo-random +-1 vector (a function of its key) to acc[SIM_HIDDEN_SIZE]. */
static void add_unit_vector(float *acc, uint64_t key) {
    uint64_t bits = 0;
    for (size_t k = 0; k < SIM_HIDDEN_SIZE; k++) {
        if (k % 64 == 0) bits = mix64(key + (uint64_t)(k / 64 + 1) * 0x9e3779b97f4a7c15ull);
        acc[k] += ((bits >> (k % 64)) & 1) ? 1.0f : -1.0f;
    }
}

/* The square root of x >= 0 by Newton's method from above (the simulator does not link libm). */
static double sqrt_pos(double x) {
    if (!(x > 0)) return 0;
    double r = x > 1 ? x : 1, next;
    while ((next = 0.5 * (r + x / r)) < r) r = next;
    return r;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* The sorted keys of the words of s[0..n), duplicates removed; returns the count (*keys: free it). */
static size_t distinct_word_keys(const char *s, size_t n, uint64_t **keys) {
    sim_span *w;
    size_t nw = find_words(s, n, &w), k = 0;
    *keys = xmalloc((nw ? nw : 1) * sizeof **keys);
    for (size_t i = 0; i < nw; i++) (*keys)[i] = word_key(s + w[i].start, w[i].len);
    free(w);
    qsort(*keys, nw, sizeof **keys, cmp_u64);
    for (size_t i = 0; i < nw; i++)
        if (k == 0 || (*keys)[k - 1] != (*keys)[i]) (*keys)[k++] = (*keys)[i];
    return k;
}

/* ---------------------------------------------------------------- JSON parser ---- */
typedef enum {
    JV_NULL,
    JV_BOOL,
    JV_NUM,
    JV_STR,
    JV_ARR,
    JV_OBJ
} jv_type;

typedef struct jv {
    jv_type type;
    bool b;
    char *s; /* JV_STR: decoded text; JV_NUM: the literal as written */
    size_t n, cap; /* JV_ARR / JV_OBJ: item count */
    struct jv **items;
    char **keys; /* JV_OBJ only, in declaration order */
} jv;

typedef struct {
    const char *s;
    size_t n, i;
    int depth;
} jparser;

static jv *jv_new(jv_type t) {
    jv *v = xmalloc(sizeof *v);
    memset(v, 0, sizeof *v);
    v->type = t;
    return v;
}

static void jv_free(jv *v) {
    if (!v) return;
    for (size_t i = 0; i < v->n; i++) {
        jv_free(v->items[i]);
        if (v->keys) free(v->keys[i]);
    }
    free(v->items);
    free(v->keys);
    free(v->s);
    free(v);
}

static void jv_push(jv *c, char *key, jv *item) {
    if (c->n == c->cap) {
        c->cap = c->cap ? c->cap * 2 : 4;
        c->items = xrealloc(c->items, c->cap * sizeof *c->items);
        if (c->type == JV_OBJ) c->keys = xrealloc(c->keys, c->cap * sizeof *c->keys);
    }
    if (c->type == JV_OBJ) c->keys[c->n] = key;
    c->items[c->n++] = item;
}

static const jv *jv_get(const jv *obj, const char *key) {
    if (!obj || obj->type != JV_OBJ) return NULL;
    for (size_t i = 0; i < obj->n; i++)
        if (strcmp(obj->keys[i], key) == 0) return obj->items[i];
    return NULL;
}

static void jp_ws(jparser *p) {
    while (p->i < p->n && (p->s[p->i] == ' ' || p->s[p->i] == '\t' || p->s[p->i] == '\n' || p->s[p->i] == '\r')) p->i++;
}

static bool jp_word(jparser *p, const char *w) {
    size_t l = strlen(w);
    if (p->n - p->i >= l && memcmp(p->s + p->i, w, l) == 0) {
        p->i += l;
        return true;
    }
    return false;
}

static bool jp_hex4(jparser *p, unsigned *out) {
    unsigned v = 0;
    if (p->n - p->i < 4) return false;
    for (int k = 0; k < 4; k++) {
        char c = p->s[p->i++];
        int d = is_digit(c)                                        ? c - '0'
                : (lower_ascii(c) >= 'a' && lower_ascii(c) <= 'f') ? lower_ascii(c) - 'a' + 10
                                                                   : -1;
        if (d < 0) return false;
        v = v * 16 + (unsigned)d;
    }
    *out = v;
    return true;
}

/* Parse a string literal at p->i (which must be '"'); returns the decoded text or NULL. */
static char *jp_string(jparser *p) {
    sbuf b = {0};
    p->i++;
    while (p->i < p->n) {
        char c = p->s[p->i++];
        if (c == '"') return sb_take(&b);
        if ((unsigned char)c < 0x20) break;
        if (c != '\\') {
            sb_add(&b, &c, 1);
            continue;
        }
        if (p->i >= p->n) break;
        char e = p->s[p->i++];
        const char *simple = strchr("\"\\/bfnrt", e);
        if (e && simple) {
            static const char repl[] = "\"\\/\b\f\n\r\t";
            sb_add(&b, &repl[simple - "\"\\/bfnrt"], 1);
        } else if (e == 'u') {
            unsigned cp, lo;
            if (!jp_hex4(p, &cp)) break;
            if (cp >= 0xD800 && cp < 0xDC00 && p->i + 1 < p->n && p->s[p->i] == '\\' && p->s[p->i + 1] == 'u') {
                p->i += 2;
                if (!jp_hex4(p, &lo)) break;
                if (lo >= 0xDC00 && lo < 0xE000)
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                else {
                    put_utf8(&b, 0xFFFD);
                    cp = lo;
                }
            }
            if ((cp >= 0xD800 && cp < 0xE000) || cp == 0) cp = 0xFFFD;
            put_utf8(&b, cp);
        } else
            break;
    }
    sb_free(&b);
    return NULL;
}

static jv *jp_number(jparser *p) {
    size_t st = p->i;
    const char *s = p->s;
    if (p->i < p->n && s[p->i] == '-') p->i++;
    if (p->i < p->n && s[p->i] == '0')
        p->i++;
    else if (p->i < p->n && is_digit(s[p->i]))
        while (p->i < p->n && is_digit(s[p->i])) p->i++;
    else
        return NULL;
    if (p->i < p->n && s[p->i] == '.') {
        p->i++;
        if (p->i >= p->n || !is_digit(s[p->i])) return NULL;
        while (p->i < p->n && is_digit(s[p->i])) p->i++;
    }
    if (p->i < p->n && (s[p->i] == 'e' || s[p->i] == 'E')) {
        p->i++;
        if (p->i < p->n && (s[p->i] == '+' || s[p->i] == '-')) p->i++;
        if (p->i >= p->n || !is_digit(s[p->i])) return NULL;
        while (p->i < p->n && is_digit(s[p->i])) p->i++;
    }
    jv *v = jv_new(JV_NUM);
    v->s = xstrndup(s + st, p->i - st);
    return v;
}

static jv *jp_value(jparser *p) {
    jp_ws(p);
    if (p->i >= p->n) return NULL;
    char c = p->s[p->i];
    if (c == '{' || c == '[') {
        char close = c == '{' ? '}' : ']';
        if (++p->depth > JSON_MAX_DEPTH) return NULL;
        jv *v = jv_new(c == '{' ? JV_OBJ : JV_ARR);
        p->i++;
        jp_ws(p);
        if (p->i < p->n && p->s[p->i] == close) {
            p->i++;
            p->depth--;
            return v;
        }
        for (;;) {
            char *key = NULL;
            if (v->type == JV_OBJ) {
                jp_ws(p);
                if (p->i >= p->n || p->s[p->i] != '"' || !(key = jp_string(p))) break;
                jp_ws(p);
                if (p->i >= p->n || p->s[p->i] != ':') {
                    free(key);
                    break;
                }
                p->i++;
            }
            jv *item = jp_value(p);
            if (!item) {
                free(key);
                break;
            }
            jv_push(v, key, item);
            jp_ws(p);
            if (p->i < p->n && p->s[p->i] == ',') {
                p->i++;
                continue;
            }
            if (p->i < p->n && p->s[p->i] == close) {
                p->i++;
                p->depth--;
                return v;
            }
            break;
        }
        jv_free(v);
        return NULL;
    }
    if (c == '"') {
        char *s = jp_string(p);
        if (!s) return NULL;
        jv *v = jv_new(JV_STR);
        v->s = s;
        return v;
    }
    bool truth = jp_word(p, "true");
    if (truth || jp_word(p, "false")) {
        jv *v = jv_new(JV_BOOL);
        v->b = truth;
        return v;
    }
    if (jp_word(p, "null")) return jv_new(JV_NULL);
    if (c == '-' || is_digit(c)) return jp_number(p);
    return NULL;
}

/* Parse one JSON value from s[0..n). Unless allow_trailing, only whitespace may follow it. */
static jv *json_parse(const char *s, size_t n, bool allow_trailing) {
    jparser p = {s, n, 0, 0};
    jv *v = jp_value(&p);
    if (v && !allow_trailing) {
        jp_ws(&p);
        if (p.i != p.n) {
            jv_free(v);
            v = NULL;
        }
    }
    return v;
}

/* Serialize like Python's json.dumps(ensure_ascii=False): ", " and ": " separators. */
static void jv_write(sbuf *b, const jv *v) {
    if (!v || v->type == JV_NULL) {
        sb_adds(b, "null");
        return;
    }
    switch (v->type) {
    case JV_BOOL: sb_adds(b, v->b ? "true" : "false"); break;
    case JV_NUM: sb_adds(b, v->s); break;
    case JV_STR: json_escape(b, v->s); break;
    default:
        sb_adds(b, v->type == JV_OBJ ? "{" : "[");
        for (size_t i = 0; i < v->n; i++) {
            if (i) sb_adds(b, ", ");
            if (v->type == JV_OBJ) {
                json_escape(b, v->keys[i]);
                sb_adds(b, ": ");
            }
            jv_write(b, v->items[i]);
        }
        sb_adds(b, v->type == JV_OBJ ? "}" : "]");
    }
}

/* ------------------------------------------------- values generated from a schema ---- */

/* The first quoted text in the prompt: '...' or "..." opening at the start, after whitespace or '(',
 * and closing before a character that is not an ASCII letter or digit (so apostrophes do not count),
 * on one line, looked for before any "JSON schema:". */
static bool quoted_text(const char *prompt, const char **start, size_t *len) {
    const char *marker = strstr(prompt, "JSON schema:");
    size_t end = marker ? (size_t)(marker - prompt) : strlen(prompt);
    for (size_t i = 0; i < end; i++) {
        char q = prompt[i];
        if ((q != '\'' && q != '"') || (i > 0 && !strchr(" \t\n\r(", prompt[i - 1]))) continue;
        for (size_t j = i + 1; j < end && prompt[j] != '\n'; j++)
            if (prompt[j] == q && j > i + 1 && !is_alnum_ascii((unsigned char)prompt[j + 1])) {
                *start = prompt + i + 1;
                *len = j - i - 1;
                return true;
            }
    }
    return false;
}

/* A string value: the first quoted text of the prompt, else its first three whitespace-separated
 * words, as a JSON string. */
static void gen_words(sbuf *out, const char *prompt) {
    const char *quoted;
    size_t qlen;
    if (quoted_text(prompt, &quoted, &qlen)) {
        char *text = xstrndup(quoted, qlen);
        json_escape(out, text);
        free(text);
        return;
    }
    sbuf w = {0};
    const char *p = prompt;
    for (int k = 0; k < 3; k++) {
        while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r') p++;
        if (!*p) break;
        const char *st = p;
        while (*p && *p != ' ' && *p != '\n' && *p != '\t' && *p != '\r') p++;
        if (w.n) sb_add(&w, " ", 1);
        sb_add(&w, st, (size_t)(p - st));
    }
    json_escape(out, w.n ? w.p : "text");
    sb_free(&w);
}

/* The first number in the prompt (integer part only unless allow_frac); fallback 42. */
static void gen_number(sbuf *out, const char *prompt, bool allow_frac) {
    for (const char *p = prompt; *p; p++) {
        if (!is_digit(*p)) continue;
        const char *st = p, *e = p;
        size_t digits = 0;
        while (is_digit(*e) && digits < 15) {
            e++;
            digits++;
        }
        while (*st == '0' && st < e - 1) st++; /* no leading zeros in JSON */
        if (p > prompt && p[-1] == '-') sb_add(out, "-", 1);
        bool frac = allow_frac && *e == '.' && is_digit(e[1]);
        if (frac) {
            e++;
            while (is_digit(*e)) e++;
        }
        sb_add(out, st, (size_t)(e - st));
        if (allow_frac && !frac) sb_adds(out, ".0");
        return;
    }
    sb_adds(out, allow_frac ? "42.0" : "42");
}

static const char *schema_type(const jv *schema) {
    const jv *t = jv_get(schema, "type");
    if (t && t->type == JV_STR) return t->s;
    if (t && t->type == JV_ARR) {
        for (size_t i = 0; i < t->n; i++)
            if (t->items[i]->type == JV_STR && strcmp(t->items[i]->s, "null") != 0) return t->items[i]->s;
        return "null";
    }
    if (jv_get(schema, "properties")) return "object";
    if (jv_get(schema, "items")) return "array";
    return "string";
}

static void gen_value(sbuf *out, const jv *schema, const char *prompt, bool all_props, int depth);

static bool name_in_array(const jv *arr, const char *name) {
    for (size_t i = 0; arr && arr->type == JV_ARR && i < arr->n; i++)
        if (arr->items[i]->type == JV_STR && strcmp(arr->items[i]->s, name) == 0) return true;
    return false;
}

/* An object: required properties (all of them if `required` is absent or all_props is set). */
static void gen_object(sbuf *out, const jv *schema, const char *prompt, bool all_props, int depth) {
    const jv *props = jv_get(schema, "properties");
    const jv *req = jv_get(schema, "required");
    bool use_all = all_props || !req || req->type != JV_ARR;
    bool first = true;
    sb_adds(out, "{");
    for (size_t i = 0; props && props->type == JV_OBJ && i < props->n; i++) {
        if (!use_all && !name_in_array(req, props->keys[i])) continue;
        if (!first) sb_adds(out, ", ");
        first = false;
        json_escape(out, props->keys[i]);
        sb_adds(out, ": ");
        gen_value(out, props->items[i], prompt, all_props, depth + 1);
    }
    sb_adds(out, "}");
}

static void gen_value(sbuf *out, const jv *schema, const char *prompt, bool all_props, int depth) {
    if (!schema || schema->type != JV_OBJ || depth > JSON_MAX_DEPTH) {
        sb_adds(out, "null");
        return;
    }
    const jv *e = jv_get(schema, "enum");
    if (e && e->type == JV_ARR && e->n) {
        jv_write(out, e->items[0]);
        return;
    }
    if ((e = jv_get(schema, "const"))) {
        jv_write(out, e);
        return;
    }
    const jv *alt = jv_get(schema, "anyOf");
    if (!alt) alt = jv_get(schema, "oneOf");
    if (!jv_get(schema, "type") && alt && alt->type == JV_ARR && alt->n) {
        gen_value(out, alt->items[0], prompt, all_props, depth + 1);
        return;
    }
    const char *t = schema_type(schema);
    if (strcmp(t, "object") == 0)
        gen_object(out, schema, prompt, all_props, depth);
    else if (strcmp(t, "integer") == 0)
        gen_number(out, prompt, false);
    else if (strcmp(t, "number") == 0)
        gen_number(out, prompt, true);
    else if (strcmp(t, "boolean") == 0)
        sb_adds(out, "true");
    else if (strcmp(t, "array") == 0)
        sb_adds(out, "[]");
    else if (strcmp(t, "null") == 0)
        sb_adds(out, "null");
    else
        gen_words(out, prompt);
}

/* ----------------------------------------------------------------- tool calls ---- */

/* One literal of a positional call `name(a, "b", 3)` as JSON: numbers/booleans/null and valid JSON
 * arrays or objects stay as they are, quoted text and bare words become strings. */
static void positional_literal(sbuf *out, const char *lit, size_t n, bool quoted) {
    char *text = xstrndup(lit, n);
    jv *v = quoted ? NULL : json_parse(text, n, false);
    if (v && v->type != JV_STR)
        jv_write(out, v);
    else
        json_escape(out, text);
    jv_free(v);
    free(text);
}

/* If the prompt contains `name(...)`, map its literals onto the schema's properties in order. */
static bool positional_args(sbuf *out, const char *name, const jv *params, const char *prompt) {
    size_t nl = strlen(name);
    const char *q = NULL;
    for (const char *p = strstr(prompt, name); p; p = strstr(p + 1, name))
        if (p[nl] == '(') {
            q = p + nl + 1;
            break;
        }
    if (!q) return false;
    const jv *props = jv_get(params, "properties");
    if (props && props->type != JV_OBJ) props = NULL;
    sb_adds(out, "{");
    size_t argi = 0;
    bool first = true;
    for (;;) {
        while (*q == ' ' || *q == '\t' || *q == '\n') q++;
        if (*q == ')' || !*q) break;
        sbuf lit = {0};
        bool quoted = *q == '"' || *q == '\'';
        if (quoted) {
            char qc = *q++;
            while (*q && *q != qc) {
                if (*q == '\\' && q[1]) q++;
                sb_add(&lit, q++, 1);
            }
            if (*q) q++;
            while (*q && *q != ',' && *q != ')') q++;
        } else {
            int depth = 0;
            const char *st = q;
            while (*q && !(depth == 0 && (*q == ',' || *q == ')'))) {
                if (*q == '(' || *q == '[' || *q == '{')
                    depth++;
                else if (*q == ')' || *q == ']' || *q == '}')
                    depth--;
                q++;
            }
            const char *e = q;
            while (e > st && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\n')) e--;
            sb_add(&lit, st, (size_t)(e - st));
        }
        const char *key = NULL;
        char keybuf[32];
        if (props && argi < props->n)
            key = props->keys[argi];
        else if (!props) {
            snprintf(keybuf, sizeof keybuf, "arg%zu", argi + 1);
            key = keybuf;
        }
        if (key) {
            if (!first) sb_adds(out, ", ");
            first = false;
            json_escape(out, key);
            sb_adds(out, ": ");
            positional_literal(out, lit.p ? lit.p : "", lit.n, quoted);
        }
        sb_free(&lit);
        argi++;
        if (*q != ',') break;
        q++;
    }
    sb_adds(out, "}");
    return true;
}

typedef struct {
    const char *name;
    const jv *params;
    size_t pos, len;
} tool_hit;

/* Name words too generic to say which tool the user means. */
static bool generic_name_word(const char *w, size_t n) {
    static const char *const words[] = {"tool", "tools", "func", "function", "call"};
    for (size_t k = 0; k < sizeof words / sizeof words[0]; k++) {
        size_t i = 0;
        while (i < n && words[k][i] && lower_ascii(w[i]) == words[k][i]) i++;
        if (i == n && !words[k][i]) return true;
    }
    return false;
}

/* Where a word of a tool name (split at '_', '-' and lower-to-upper case changes; 4+ characters; not
 * generic) first occurs in the prompt as a whole word, case-insensitively. */
static bool name_word_in_prompt(const char *name, const char *prompt, size_t *pos) {
    bool found = false;
    for (const char *s = name; *s;) {
        while (*s == '_' || *s == '-') s++;
        if (!*s) break;
        const char *st = s++;
        while (*s && *s != '_' && *s != '-' && !(s[-1] >= 'a' && s[-1] <= 'z' && *s >= 'A' && *s <= 'Z')) s++;
        size_t n = (size_t)(s - st);
        if (n < 4 || generic_name_word(st, n)) continue;
        for (const char *p = prompt; *p; p++) {
            size_t i = 0;
            while (i < n && p[i] && lower_ascii(p[i]) == lower_ascii(st[i])) i++;
            if (i == n && (p == prompt || !is_alnum_ascii((unsigned char)p[-1])) &&
                !is_alnum_ascii((unsigned char)p[n])) {
                if (!found || (size_t)(p - prompt) < *pos) *pos = (size_t)(p - prompt);
                found = true;
                break;
            }
        }
    }
    return found;
}

/* Rule 2: if the prompt names a declared tool, reply with <tool_call> block(s). */
static bool reply_tool_calls(sbuf *out, const char *tools_json, const char *prompt) {
    jv *arr = json_parse(tools_json, strlen(tools_json), false);
    if (!arr || arr->type != JV_ARR || arr->n == 0) {
        jv_free(arr);
        return false;
    }
    tool_hit *hits = xmalloc(arr->n * sizeof *hits);
    size_t nh = 0;
    for (size_t i = 0; i < arr->n; i++) {
        const jv *fn = jv_get(arr->items[i], "function");
        if (!fn || fn->type != JV_OBJ) fn = arr->items[i];
        const jv *name = jv_get(fn, "name");
        if (!name || name->type != JV_STR || !name->s[0]) continue;
        const char *at = strstr(prompt, name->s);
        if (!at) continue;
        tool_hit h = {name->s, jv_get(fn, "parameters"), (size_t)(at - prompt), strlen(name->s)};
        /* insertion sort: by position, longest name first at equal positions */
        size_t k = nh++;
        while (k > 0 && (hits[k - 1].pos > h.pos || (hits[k - 1].pos == h.pos && hits[k - 1].len < h.len))) {
            hits[k] = hits[k - 1];
            k--;
        }
        hits[k] = h;
    }
    /* drop matches nested inside an earlier (longer) match, e.g. "weather" inside "get_weather" */
    size_t kept = 0, end = 0;
    for (size_t i = 0; i < nh; i++)
        if (kept == 0 || hits[i].pos >= end) {
            hits[kept++] = hits[i];
            end = hits[i].pos + hits[i].len;
        }
    /* no tool named: one whose name has a word the prompt uses ("weather" -> get_weather), the earliest
     * such word winning; never for a prompt that carries a tool result */
    if (kept == 0 && !strstr(prompt, "<tool_response>"))
        for (size_t i = 0; i < arr->n; i++) {
            const jv *fn = jv_get(arr->items[i], "function");
            if (!fn || fn->type != JV_OBJ) fn = arr->items[i];
            const jv *name = jv_get(fn, "name");
            size_t pos = 0;
            if (!name || name->type != JV_STR || !name->s[0] || !name_word_in_prompt(name->s, prompt, &pos)) continue;
            if (kept == 0 || pos < hits[0].pos) {
                hits[0] = (tool_hit){name->s, jv_get(fn, "parameters"), pos, 0};
                kept = 1;
            }
        }
    size_t use = (kept > 1 && ci_find(prompt, "two tools")) ? kept : (kept ? 1 : 0);
    for (size_t i = 0; i < use; i++) {
        if (i) sb_adds(out, "\n");
        sb_adds(out, "<tool_call>\n{\"name\": ");
        json_escape(out, hits[i].name);
        sb_adds(out, ", \"arguments\": ");
        if (!positional_args(out, hits[i].name, hits[i].params, prompt)) {
            if (hits[i].params && hits[i].params->type == JV_OBJ)
                gen_object(out, hits[i].params, prompt, false, 0);
            else
                sb_adds(out, "{}");
        }
        sb_adds(out, "}\n</tool_call>");
    }
    free(hits);
    jv_free(arr);
    return use > 0;
}

/* Rule 3: "JSON schema:" followed by a schema object → an instance of it. */
static bool reply_json_schema(sbuf *out, const char *prompt) {
    const char *m = strstr(prompt, "JSON schema:");
    if (!m) m = strstr(prompt, "JSON schema to follow:"); /* LlamaIndex's default format prompt */
    const char *brace = m ? strchr(m, '{') : NULL;
    if (!brace) return false;
    jv *schema = json_parse(brace, strlen(brace), true);
    if (!schema) { /* a template that doubled its braces ("{{...}}"): read it with single ones */
        sbuf single = {0};
        for (const char *c = brace; *c; c++) {
            sb_add(&single, c, 1);
            if ((c[0] == '{' && c[1] == '{') || (c[0] == '}' && c[1] == '}')) c++;
        }
        char *text = sb_take(&single);
        schema = json_parse(text, strlen(text), true);
        free(text);
    }
    if (!schema || schema->type != JV_OBJ) {
        jv_free(schema);
        return false;
    }
    gen_value(out, schema, prompt, true, 0);
    jv_free(schema);
    return true;
}

/* Rule 4: "count to N" → "1 2 ... N". */
static bool reply_count(sbuf *out, const char *prompt) {
    const char *c = ci_find(prompt, "count to ");
    if (!c || !is_digit(c[9])) return false;
    long n = 0;
    for (const char *d = c + 9; is_digit(*d) && n <= 100000; d++) n = n * 10 + (*d - '0');
    if (n < 1 || n > 100000) return false;
    for (long i = 1; i <= n; i++) sb_addf(out, i == 1 ? "%ld" : " %ld", i);
    return true;
}

/* ------------------------------------------------------------- global state ---- */

enum {
    C_LIVE_HANDLES, C_INITS, C_INIT_FAILURES, C_DESTROYS, C_RUNS, C_ACTIVE_RUNS, C_MAX_ACTIVE_RUNS,
    C_PREFILLED_TOKENS, C_GENERATED_TOKENS, C_CALLBACKS, C_ABORTS, C_PAUSES, C_ERRORS, C_KV_CLEARS,
    C_PC_SAVES, C_PC_LOADS, C_PC_RELEASES, C_PC_HIT_TOKENS, C_LORA_LOADS, C_TEMPLATE_SETS, C_TOOLS_SETS,
    C_CONTEXT_SHIFTS, C_BUSY_NS, C_INVALID_HANDLE_CALLS, C_CONCURRENT_RUN_VIOLATIONS,
    C_DESTROY_WHILE_RUNNING, C_TRACE_DROPPED, C_RESIDENT_HANDLES, C_MAX_RESIDENT_HANDLES, C_BATCHED_RUNS,
    C_BATCH_STEPS, C_BATCH_REFUSALS, C_MULTIMODAL_VIOLATIONS, C_COUNT
};

static const char *const counter_names[C_COUNT] = {
    "live_handles", "inits", "init_failures", "destroys", "runs", "active_runs", "max_active_runs",
    "prefilled_tokens", "generated_tokens", "callbacks", "aborts", "pauses", "errors", "kv_clears",
    "prompt_cache_saves", "prompt_cache_loads", "prompt_cache_releases", "prompt_cache_hit_tokens",
    "lora_loads", "template_sets", "tools_sets", "context_shifts", "busy_ns", "invalid_handle_calls",
    "concurrent_run_violations", "destroy_while_running", "trace_dropped", "resident_handles",
    "max_resident_handles", "batched_runs", "batch_steps", "batch_refusals", "multimodal_violations",
};

typedef struct {
    double token_delay_ms, prefill_ms_per_token, init_delay_ms, destroy_delay_ms;
    double error_after_tokens; /* one-shot, < 0 = off */
    double finish_after_abort, waiting_text, split_utf8_normal, trace, banner;
    double batch_step_cost, batch_finish; /* n_batch > 1: see the top comment */
} sim_settings;

static const struct {
    const char *name, *env;
    size_t off;
} setting_keys[] = {
    {"token_delay_ms", "RKLLM_SIM_TOKEN_DELAY_MS", offsetof(sim_settings, token_delay_ms)},
    {"prefill_ms_per_token", "RKLLM_SIM_PREFILL_MS_PER_TOKEN", offsetof(sim_settings, prefill_ms_per_token)},
    {"init_delay_ms", "RKLLM_SIM_INIT_DELAY_MS", offsetof(sim_settings, init_delay_ms)},
    {"destroy_delay_ms", NULL, offsetof(sim_settings, destroy_delay_ms)},
    {"error_after_tokens", NULL, offsetof(sim_settings, error_after_tokens)},
    {"finish_after_abort", NULL, offsetof(sim_settings, finish_after_abort)},
    {"waiting_text", NULL, offsetof(sim_settings, waiting_text)},
    {"split_utf8_normal", NULL, offsetof(sim_settings, split_utf8_normal)},
    {"trace", "RKLLM_SIM_TRACE", offsetof(sim_settings, trace)},
    {"banner", NULL, offsetof(sim_settings, banner)},
    {"batch_step_cost", "RKLLM_SIM_BATCH_STEP_COST", offsetof(sim_settings, batch_step_cost)},
    {"batch_finish", "RKLLM_SIM_BATCH_FINISH", offsetof(sim_settings, batch_finish)},
};

/* The KV cache: the bytes of every cached token plus each token's byte length (0 for tokens that
 * came from token ids, embeddings or images). */
typedef struct {
    sbuf text;
    int *lens;
    size_t n, cap;
    size_t sys_tokens; /* leading tokens that belong to the system part */
} sim_kv;

typedef struct {
    char *name, *path;
} sim_lora;

typedef struct sim_handle {
    size_t id;
    int refs; /* API calls and async workers currently using this struct */
    bool running, abort_flag;
    /* model */
    char *model_path; /* canonical path */
    long long model_size;
    int memory_mb; /* from the header, or -1 */
    bool think; /* family supports <think> */
    int yes_token, no_token; /* a reranker's answer tokens, or -1 */
    int hidden_size; /* the width of one image-embedding row, or 0 when the model declares none */
    char *img_start, *img_end, *img_content; /* 1.2: the image tags from RKLLMParam at init (NULL = unset) */
    /* init parameters */
    int max_context_len, max_new_tokens, n_keep, n_batch;
    LLMResultCallback cb;
    void *cb_userdata;
    /* chat template and tools */
    bool custom_template;
    char *system_prompt; /* NULL = default */
    char *prefix, *postfix;
    char *tools_json; /* NULL = no tools */
    char *tool_tag; /* NULL = "tool_response" */
    sim_kv kv; /* slot 0's cache (the only one unless n_batch > 1) */
    sim_kv *slot_kv; /* n_batch > 1: the caches of slots 1 .. n_batch-1 */
    char *pcache_text; /* loaded prompt cache, or NULL */
    sim_lora *loras;
    size_t n_loras;
} sim_handle;

static struct {
    pthread_mutex_t lock;
    pthread_cond_t cond; /* signalled when a handle's refs drop */
    long long counters[C_COUNT];
    sim_settings set;
    sim_handle **table; /* indexed by handle id; NULL once destroyed; ids are never reused */
    size_t table_len;
    sbuf trace;
    unsigned long tmp_seq;
} G = {
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .cond = PTHREAD_COND_INITIALIZER,
    .set = {.error_after_tokens = -1, .banner = 1, .batch_step_cost = 0.15},
};

static void lock(void) { pthread_mutex_lock(&G.lock); }
static void unlock(void) { pthread_mutex_unlock(&G.lock); }

static void count_add(int c, long long v) {
    lock();
    G.counters[c] += v;
    unlock();
}

static void resident_add(long long v) {
    lock();
    G.counters[C_RESIDENT_HANDLES] += v;
    if (G.counters[C_RESIDENT_HANDLES] > G.counters[C_MAX_RESIDENT_HANDLES])
        G.counters[C_MAX_RESIDENT_HANDLES] = G.counters[C_RESIDENT_HANDLES];
    unlock();
}

/* ---------------------------------------------------------------------- trace ---- */

static size_t handle_decode(LLMHandle handle) {
    uintptr_t v = (uintptr_t)handle;
    if (v <= SIM_HANDLE_BASE || (v - SIM_HANDLE_BASE) % 16) return 0;
    return (size_t)((v - SIM_HANDLE_BASE) / 16);
}

/* Start a trace line; returns false (and writes nothing) when tracing is off. */
static bool trace_begin(sbuf *b, const char *fn, bool with_handle, LLMHandle handle) {
    lock();
    bool on = G.set.trace != 0;
    unlock();
    if (!on) return false;
    sb_addf(b, "{\"fn\":\"%s\"", fn);
    if (with_handle) sb_addf(b, ",\"handle\":%zu", handle_decode(handle));
    return true;
}

static void tr_key(sbuf *b, const char *k) { sb_addf(b, ",\"%s\":", k); }
static void tr_str(sbuf *b, const char *k, const char *v) {
    tr_key(b, k);
    json_escape(b, v);
}
static void tr_int(sbuf *b, const char *k, long long v) { sb_addf(b, ",\"%s\":%lld", k, v); }
static void tr_bool(sbuf *b, const char *k, bool v) { sb_addf(b, ",\"%s\":%s", k, v ? "true" : "false"); }
static void tr_num(sbuf *b, const char *k, double v) {
    if (isfinite(v))
        sb_addf(b, ",\"%s\":%.9g", k, v);
    else
        sb_addf(b, ",\"%s\":null", k);
}

static void trace_end(sbuf *b) {
    sb_adds(b, "}\n");
    lock();
    if (G.trace.n + b->n > SIM_TRACE_CAP)
        G.counters[C_TRACE_DROPPED]++;
    else
        sb_add(&G.trace, b->p, b->n);
    unlock();
    sb_free(b);
}

/* With trace >= 2: what a run's answer is conditioned on, i.e. the KV cache's text once its input is
 * prefilled (the system part, earlier turns kept with keep_history, and this turn). */
static void trace_context(size_t id, const char *text) {
    sbuf b = {0};
    sb_addf(&b, "{\"fn\":\"prefilled\",\"handle\":%zu", id);
    tr_str(&b, "context", text);
    trace_end(&b);
}

/* A line with just the function name and the handle. */
static void trace_simple(const char *fn, LLMHandle handle) {
    sbuf b = {0};
    if (trace_begin(&b, fn, true, handle)) trace_end(&b);
}

/* ---------------------------------------------------------------------- KV cache ---- */

static void kv_push(sim_kv *kv, const char *bytes, int len) {
    if (kv->n == kv->cap) {
        kv->cap = kv->cap ? kv->cap * 2 : 256;
        kv->lens = xrealloc(kv->lens, kv->cap * sizeof *kv->lens);
    }
    kv->lens[kv->n++] = len;
    if (len > 0) sb_add(&kv->text, bytes, (size_t)len);
}

/* Remove tokens [start, end). */
static void kv_remove(sim_kv *kv, size_t start, size_t end) {
    if (end > kv->n) end = kv->n;
    if (start >= end) return;
    size_t b0 = 0, b1;
    for (size_t i = 0; i < start; i++) b0 += (size_t)kv->lens[i];
    b1 = b0;
    for (size_t i = start; i < end; i++) b1 += (size_t)kv->lens[i];
    if (kv->text.p) {
        memmove(kv->text.p + b0, kv->text.p + b1, kv->text.n - b1 + 1);
        kv->text.n -= b1 - b0;
    }
    memmove(kv->lens + start, kv->lens + end, (kv->n - end) * sizeof *kv->lens);
    kv->n -= end - start;
    if (start < kv->sys_tokens) kv->sys_tokens = end >= kv->sys_tokens ? start : kv->sys_tokens - (end - start);
}

static void kv_clear(sim_kv *kv) { kv_remove(kv, 0, kv->n); }

/* Make room for `need` new tokens: keep the first n_keep (or the system part), drop the oldest. */
static void kv_make_room(sim_kv *kv, size_t need, size_t max_ctx, int n_keep) {
    if (kv->n + need <= max_ctx) return;
    size_t keep = n_keep < 0 ? kv->sys_tokens : (size_t)n_keep;
    if (keep > kv->n) keep = kv->n;
    size_t droppable = kv->n - keep, overflow = kv->n + need - max_ctx;
    size_t drop = overflow > droppable / 2 ? overflow : droppable / 2;
    if (drop > droppable) drop = droppable;
    kv_remove(kv, keep, keep + drop);
    if (kv->n + need > max_ctx) kv_clear(kv); /* not even the kept part fits */
    G.counters[C_CONTEXT_SHIFTS]++;
}

/* ---------------------------------------------------------------------- handles ---- */

/* The KV cache of batch slot i (0 <= i < n_batch). */
static sim_kv *kv_of(sim_handle *h, int i) { return i == 0 ? &h->kv : &h->slot_kv[i - 1]; }

static sim_handle *handle_find_locked(LLMHandle handle) {
    size_t id = handle_decode(handle);
    return (id && id < G.table_len) ? G.table[id] : NULL;
}

/* Look up a handle and pin it (refs++); NULL (and a counted invalid call) if unknown. */
static sim_handle *handle_acquire(LLMHandle handle) {
    lock();
    sim_handle *h = handle_find_locked(handle);
    if (h)
        h->refs++;
    else
        G.counters[C_INVALID_HANDLE_CALLS]++;
    unlock();
    return h;
}

static void handle_release(sim_handle *h) {
    lock();
    h->refs--;
    pthread_cond_broadcast(&G.cond);
    unlock();
}

static void handle_free(sim_handle *h) {
    free(h->model_path);
    free(h->img_start);
    free(h->img_end);
    free(h->img_content);
    free(h->system_prompt);
    free(h->prefix);
    free(h->postfix);
    free(h->tools_json);
    free(h->tool_tag);
    sb_free(&h->kv.text);
    free(h->kv.lens);
    for (int i = 0; h->slot_kv && i < h->n_batch - 1; i++) {
        sb_free(&h->slot_kv[i].text);
        free(h->slot_kv[i].lens);
    }
    free(h->slot_kv);
    free(h->pcache_text);
    for (size_t i = 0; i < h->n_loras; i++) {
        free(h->loras[i].name);
        free(h->loras[i].path);
    }
    free(h->loras);
    free(h);
}

/* A custom template that declares tools the Qwen way lists one JSON object per line between
 * "<tools>" and "</tools>" in its system text. Return them as a JSON array, or NULL. */
static char *tools_from_template_text(const char *text) {
    const char *start = strstr(text, "<tools>\n");
    if (!start) return NULL;
    start += strlen("<tools>\n");
    const char *end = strstr(start, "</tools>");
    if (!end) return NULL;
    sbuf arr = {0};
    sb_adds(&arr, "[");
    size_t count = 0;
    for (const char *line = start; line < end;) {
        const char *nl = memchr(line, '\n', (size_t)(end - line));
        const char *stop = nl ? nl : end;
        if (stop > line) {
            if (count++) sb_adds(&arr, ",");
            sb_add(&arr, line, (size_t)(stop - line));
        }
        line = nl ? nl + 1 : end;
    }
    sb_adds(&arr, "]");
    char *json = sb_take(&arr);
    jv *parsed = json_parse(json, strlen(json), false);
    bool ok = parsed && parsed->type == JV_ARR && parsed->n > 0;
    jv_free(parsed);
    if (!ok) {
        free(json);
        return NULL;
    }
    return json;
}

/* --------------------------------------------------------------------- template ---- */

static void append_system_part(sbuf *b, const sim_handle *h) {
    const char *sys = h->system_prompt ? h->system_prompt : SIM_DEFAULT_SYSTEM;
    if (h->custom_template) {
        sb_adds(b, sys);
        return;
    }
    sb_adds(b, "<|im_start|>system\n");
    sb_adds(b, sys);
    if (h->tools_json) {
        sb_adds(b, "\n\n# Tools\n<tools>\n");
        sb_adds(b, h->tools_json);
        sb_adds(b, "\n</tools>");
    }
    sb_adds(b, "<|im_end|>\n");
}

static void append_turn(sbuf *b, const sim_handle *h, const char *role, const char *prompt, bool thinking) {
    if (h->custom_template) {
        sb_adds(b, h->prefix);
        sb_adds(b, prompt);
        sb_adds(b, h->postfix);
        return;
    }
    sb_adds(b, "<|im_start|>user\n");
    if (strcmp(role, "tool") == 0) {
        const char *tag = h->tool_tag ? h->tool_tag : "tool_response";
        sb_addf(b, "<%s>\n%s\n</%s>", tag, prompt, tag);
    } else
        sb_adds(b, prompt);
    sb_adds(b, "<|im_end|>\n<|im_start|>assistant\n");
    if (!thinking && h->think) sb_adds(b, "<think>\n\n</think>\n\n");
}

/* ----------------------------------------------------------------- model files ---- */

typedef struct {
    long long size;
    int header_ctx, memory_mb, think;
    int yes_token, no_token; /* a reranker's answer tokens, or -1 */
    int hidden_size;
} model_info;

static int read_model(const char *path, model_info *mi) {
    struct stat st;
    FILE *f = fopen(path, "rb");
    if (!f) {
        sim_log("failed to open model file %s: %s", path, strerror(errno));
        return -1;
    }
    char buf[4097];
    size_t n = 0;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
        sim_log("model path %s is not a regular file", path);
        fclose(f);
        return -1;
    }
    n = fread(buf, 1, 4096, f);
    fclose(f);
    buf[n] = '\0';
    if (n < 8 || memcmp(buf, "RKLLMSIM", 8) != 0) {
        sim_log("invalid model file %s: bad magic (not an RKLLMSIM model)", path);
        return -1;
    }
    mi->size = (long long)st.st_size;
    mi->header_ctx = -1;
    mi->memory_mb = -1;
    mi->think = 1;
    mi->yes_token = mi->no_token = -1;
    mi->hidden_size = 0;
    char *line = strchr(buf, '\n');
    while (line && *++line && *line != '\n' && *line != '\r') {
        char *eol = strchr(line, '\n');
        if (eol) *eol = '\0';
        const char *v = strchr(line, '=');
        if (v) {
            v++;
            if (strncmp(line, "max_context=", 12) == 0)
                mi->header_ctx = atoi(v);
            else if (strncmp(line, "memory_mb=", 10) == 0)
                mi->memory_mb = atoi(v);
            else if (strncmp(line, "think=", 6) == 0)
                mi->think = atoi(v) != 0;
            else if (strncmp(line, "yes_token=", 10) == 0)
                mi->yes_token = atoi(v);
            else if (strncmp(line, "no_token=", 9) == 0)
                mi->no_token = atoi(v);
            else if (strncmp(line, "hidden_size=", 12) == 0)
                mi->hidden_size = atoi(v);
        }
        line = eol;
    }
    bool reranker = mi->yes_token >= 0 || mi->no_token >= 0;
    if (reranker && (mi->yes_token < 0 || mi->no_token < 0 || mi->yes_token >= (int)SIM_VOCAB ||
                     mi->no_token >= (int)SIM_VOCAB || mi->yes_token == mi->no_token)) {
        sim_log("invalid model file %s: yes_token and no_token must both be set, distinct and in [0, %u)", path,
                SIM_VOCAB);
        return -1;
    }
    return 0;
}

/* The model's context limit: ctx<digits> in the file name, else the header, else 4096. */
static int model_ctx_limit(const char *path, const model_info *mi) {
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    for (const char *p = base; (p = ci_find(p, "ctx")); p++)
        if (is_digit(p[3])) {
            long v = 0;
            for (const char *d = p + 3; is_digit(*d) && v < 100000000; d++) v = v * 10 + (*d - '0');
            return (int)v;
        }
    return mi->header_ctx > 0 ? mi->header_ctx : 4096;
}

/* ------------------------------------------------------------------ the public API ---- */

SIM_API int rkllm_sim_abi(void) { return RKLLM_SIM_ABI; }
SIM_API const char *rkllm_sim_version(void) { return SIM_VERSION; }

SIM_API RKLLMParam rkllm_createDefaultParam(void) {
    sbuf b = {0};
    if (trace_begin(&b, "rkllm_createDefaultParam", false, NULL)) trace_end(&b);
    RKLLMParam p;
    memset(&p, 0, sizeof p);
    p.max_context_len = 512;
    p.max_new_tokens = -1;
    p.top_k = 1;
    p.n_keep = -1;
    p.top_p = 0.9f;
    p.temperature = 0.8f;
    p.repeat_penalty = 1.1f;
    p.mirostat_tau = 5.0f;
    p.mirostat_eta = 0.1f;
    p.skip_special_token = true;
    p.extend_param.enabled_cpus_num = 4;
    p.extend_param.n_batch = 1;
    return p;
}

static void apply_env_settings_locked(void) {
    for (size_t i = 0; i < sizeof setting_keys / sizeof setting_keys[0]; i++) {
        const char *v = setting_keys[i].env ? getenv(setting_keys[i].env) : NULL;
        char *end;
        if (!v || !*v) continue;
        double d = strtod(v, &end);
        if (end != v) *(double *)((char *)&G.set + setting_keys[i].off) = d;
    }
}

static int init_common(LLMHandle *handle, RKLLMParam *param, LLMResultCallback cb, void *cb_userdata) {
    sbuf b = {0};
    if (trace_begin(&b, "rkllm_init", false, NULL)) {
        if (param) {
            tr_str(&b, "model_path", param->model_path);
            tr_int(&b, "max_context_len", param->max_context_len);
            tr_int(&b, "max_new_tokens", param->max_new_tokens);
            tr_int(&b, "top_k", param->top_k);
            tr_num(&b, "top_p", param->top_p);
            tr_num(&b, "temperature", param->temperature);
            tr_num(&b, "repeat_penalty", param->repeat_penalty);
            tr_num(&b, "frequency_penalty", param->frequency_penalty);
            tr_num(&b, "presence_penalty", param->presence_penalty);
            tr_int(&b, "mirostat", param->mirostat);
            tr_num(&b, "mirostat_tau", param->mirostat_tau);
            tr_num(&b, "mirostat_eta", param->mirostat_eta);
            tr_int(&b, "n_keep", param->n_keep);
            tr_bool(&b, "is_async", param->is_async);
            tr_int(&b, "n_batch", param->extend_param.n_batch);
#if RKLLM_SIM_ABI == 12
            tr_str(&b, "img_start", param->img_start);
            tr_str(&b, "img_end", param->img_end);
            tr_str(&b, "img_content", param->img_content);
#endif
        } else
            sb_adds(&b, ",\"param\":null");
        trace_end(&b);
    }
    lock();
    apply_env_settings_locked();
    bool banner = G.set.banner != 0;
    double delay = G.set.init_delay_ms;
    unlock();
    if (banner)
        fprintf(stderr,
                "I rkllm: rkllm-runtime version: %s (simulator), rknpu driver version: 0.9.8, "
                "platform: SIMULATOR\n",
                SIM_VERSION);
    if (handle) *handle = NULL;
    model_info mi;
    int limit = 0, ctx = 0;
    const char *fail = NULL;
    if (!handle || !param || !param->model_path)
        fail = "rkllm_init: handle, param and param->model_path must not be NULL";
    else if (!cb)
        fail = "rkllm_init: the result callback must not be NULL";
    if (!fail) {
        resident_add(1);
        sleep_ms(delay);
    }
    if (fail || read_model(param->model_path, &mi) != 0) {
        if (fail) sim_log("%s", fail);
        else resident_add(-1);
        count_add(C_INIT_FAILURES, 1);
        return -1;
    }
    limit = model_ctx_limit(param->model_path, &mi);
    ctx = param->max_context_len <= 0 ? limit : param->max_context_len;
    if (ctx > limit || param->extend_param.n_batch > SIM_MAX_BATCH) {
        if (ctx > limit)
            sim_log("max_context[%d] must be less than the model's max_context_limit[%d]", ctx, limit);
        else
            sim_log("The n_batch must be between 1 and %d", SIM_MAX_BATCH);
        resident_add(-1);
        count_add(C_INIT_FAILURES, 1);
        return -1;
    }
    sim_handle *h = xmalloc(sizeof *h);
    memset(h, 0, sizeof *h);
    char *canon = realpath(param->model_path, NULL);
    h->model_path = canon ? canon : xstrdup(param->model_path);
    h->model_size = mi.size;
    h->memory_mb = mi.memory_mb;
    h->think = mi.think != 0;
    h->yes_token = mi.yes_token;
    h->no_token = mi.no_token;
    h->hidden_size = mi.hidden_size > 0 ? mi.hidden_size : 0;
#if RKLLM_SIM_ABI == 12
    h->img_start = xstrdup(param->img_start);
    h->img_end = xstrdup(param->img_end);
    h->img_content = xstrdup(param->img_content);
#endif
    h->max_context_len = ctx;
    h->max_new_tokens = param->max_new_tokens;
    h->n_keep = param->n_keep;
    h->n_batch = param->extend_param.n_batch ? param->extend_param.n_batch : 1;
    if (h->n_batch > 1) {
        h->slot_kv = xmalloc((size_t)(h->n_batch - 1) * sizeof *h->slot_kv);
        memset(h->slot_kv, 0, (size_t)(h->n_batch - 1) * sizeof *h->slot_kv);
    }
    h->cb = cb;
    h->cb_userdata = cb_userdata;
    lock();
    if (G.table_len == 0) G.table_len = 1; /* id 0 is never used */
    G.table = xrealloc(G.table, (G.table_len + 1) * sizeof *G.table);
    h->id = G.table_len++;
    G.table[h->id] = h;
    G.counters[C_LIVE_HANDLES]++;
    G.counters[C_INITS]++;
    unlock();
    *handle = (LLMHandle)(SIM_HANDLE_BASE + 16 * (uintptr_t)h->id);
    return 0;
}

#if RKLLM_SIM_ABI >= 13
SIM_API int rkllm_init(LLMHandle *handle, RKLLMParam *param, RKLLMCallback *callback) {
    return init_common(handle, param, callback ? callback->result_callback : NULL,
                       callback ? callback->result_userdata : NULL);
}
#else
SIM_API int rkllm_init(LLMHandle *handle, RKLLMParam *param, LLMResultCallback callback) {
    return init_common(handle, param, callback, NULL);
}
#endif

SIM_API int rkllm_destroy(LLMHandle handle) {
    trace_simple("rkllm_destroy", handle);
    lock();
    sim_handle *h = handle_find_locked(handle);
    if (!h) {
        G.counters[C_INVALID_HANDLE_CALLS]++;
        unlock();
        return -1;
    }
    if (h->running) {
        G.counters[C_DESTROY_WHILE_RUNNING]++;
        unlock();
        sim_log("rkllm_destroy: a run is still active on this handle; abort it and wait first");
        return -1;
    }
    G.table[h->id] = NULL; /* new calls now fail; wait for the calls still inside */
    while (h->refs > 0) pthread_cond_wait(&G.cond, &G.lock);
    double delay = G.set.destroy_delay_ms;
    unlock();
    sleep_ms(delay);
    handle_free(h);
    lock();
    G.counters[C_DESTROYS]++;
    G.counters[C_LIVE_HANDLES]--;
    unlock();
    resident_add(-1);
    return 0;
}

SIM_API int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter *a) {
    sbuf b = {0};
    if (trace_begin(&b, "rkllm_load_lora", true, handle)) {
        tr_str(&b, "path", a ? a->lora_adapter_path : NULL);
        tr_str(&b, "name", a ? a->lora_adapter_name : NULL);
        tr_num(&b, "scale", a ? a->scale : 0.0);
        trace_end(&b);
    }
    sim_handle *h = handle_acquire(handle);
    if (!h) return -1;
    struct stat st;
    int rc = -1;
    if (!a || !a->lora_adapter_path || stat(a->lora_adapter_path, &st) != 0)
        sim_log("rkllm_load_lora: adapter file %s not found",
                a && a->lora_adapter_path ? a->lora_adapter_path : "(null)");
    else {
        const char *name = a->lora_adapter_name;
        if (!name || !*name) {
            name = strrchr(a->lora_adapter_path, '/');
            name = name ? name + 1 : a->lora_adapter_path;
        }
        lock();
        size_t i = 0;
        while (i < h->n_loras && strcmp(h->loras[i].name, name) != 0) i++;
        if (i == h->n_loras) {
            h->loras = xrealloc(h->loras, (h->n_loras + 1) * sizeof *h->loras);
            h->loras[h->n_loras++].name = xstrdup(name);
        } else
            free(h->loras[i].path);
        h->loras[i].path = xstrdup(a->lora_adapter_path);
        G.counters[C_LORA_LOADS]++;
        unlock();
        rc = 0;
    }
    handle_release(h);
    return rc;
}

SIM_API int rkllm_load_prompt_cache(LLMHandle handle, const char *path) {
    sbuf b = {0};
    if (trace_begin(&b, "rkllm_load_prompt_cache", true, handle)) {
        tr_str(&b, "path", path);
        trace_end(&b);
    }
    sim_handle *h = handle_acquire(handle);
    if (!h) return -1;
    int rc = -1;
    sbuf data = {0};
    FILE *f = path ? fopen(path, "rb") : NULL;
    if (f) {
        char chunk[65536];
        size_t n;
        while ((n = fread(chunk, 1, sizeof chunk, f)) > 0 && data.n < ((size_t)256 << 20)) sb_add(&data, chunk, n);
        fclose(f);
    }
    const char *hdr = "RKLLMSIM-PCACHE 1\n";
    char *line2 = data.p && strncmp(data.p, hdr, strlen(hdr)) == 0 ? data.p + strlen(hdr) : NULL;
    char *eol = line2 ? strchr(line2, '\n') : NULL;
    if (!f)
        sim_log("rkllm_load_prompt_cache: cannot open %s", path ? path : "(null)");
    else if (!eol)
        sim_log("rkllm_load_prompt_cache: %s is not a prompt cache file", path);
    else {
        char *sp = strchr(line2, ' ');
        *eol = '\0';
        lock();
        bool same = sp && sp < eol && atoll(line2) == h->model_size && strcmp(sp + 1, h->model_path) == 0;
        if (same) {
            free(h->pcache_text);
            h->pcache_text = xstrdup(eol + 1);
            G.counters[C_PC_LOADS]++;
            rc = 0;
        }
        unlock();
        if (!same) sim_log("rkllm_load_prompt_cache: %s was made for a different model", path);
    }
    sb_free(&data);
    handle_release(h);
    return rc;
}

SIM_API int rkllm_release_prompt_cache(LLMHandle handle) {
    trace_simple("rkllm_release_prompt_cache", handle);
    sim_handle *h = handle_acquire(handle);
    if (!h) return -1;
    lock();
    free(h->pcache_text);
    h->pcache_text = NULL;
    G.counters[C_PC_RELEASES]++;
    unlock();
    handle_release(h);
    return 0;
}

/* Atomically write a prompt cache file (temp file + rename). */
static int save_prompt_cache(const char *path, const char *model_path, long long size, const char *text) {
    sbuf tmp = {0};
    lock();
    unsigned long seq = ++G.tmp_seq;
    unlock();
    sb_addf(&tmp, "%s.tmp.%ld.%lu", path, (long)getpid(), seq);
    FILE *f = fopen(tmp.p, "wb");
    int ok = f != NULL;
    if (f) {
        ok = fprintf(f, "RKLLMSIM-PCACHE 1\n%lld %s\n", size, model_path) > 0;
        ok = ok && fwrite(text, 1, strlen(text), f) == strlen(text);
        ok = (fclose(f) == 0) && ok;
        ok = ok && rename(tmp.p, path) == 0;
        if (!ok) unlink(tmp.p);
    }
    if (!ok) sim_log("failed to save the prompt cache to %s", path);
    sb_free(&tmp);
    return ok ? 0 : -1;
}

/* ----------------------------------------------------------------------- runs ---- */

typedef struct {
    sim_handle *h;
    bool async;
    RKLLMInputType input_type;
    char *role;
    bool enable_thinking;
    char *prompt; /* text for the template (PROMPT / MULTIMODAL), else NULL */
    char *reply_prompt; /* what rule 6 echoes */
    bool custom_thinks; /* custom template whose turn ends in a bare assistant header (no empty think block) */
    size_t extra_tokens; /* tokens without text: ids, embeddings, images, video frames */
    int32_t *ids; /* token input: the ids (extra_tokens of them), else NULL */
    char *images; /* multimodal input: what the "model" sees in the images, else NULL */
    int mode, keep_history, max_new_tokens;
    char *lora;
    bool save_pcache;
    char *pcache_path;
    LLMResultCallback cb;
    void *userdata;
    sim_settings set; /* snapshot taken when the run starts */
    int err_after; /* one-shot error_after_tokens, or -1 */
    int ret;
} sim_job;

static void job_free(sim_job *j) {
    free(j->ids);
    free(j->images);
    free(j->role);
    free(j->prompt);
    free(j->reply_prompt);
    free(j->lora);
    free(j->pcache_path);
    free(j);
}

static bool abort_requested(sim_handle *h) {
    lock();
    bool a = h->abort_flag;
    unlock();
    return a;
}

/* Sleep in 1 ms slices; true if an abort arrived (checked at least once, even for 0 ms). */
static bool sleep_abortable(sim_handle *h, double ms) {
    int64_t end = now_ns() + (int64_t)(ms > 0 ? ms * 1e6 : 0);
    for (;;) {
        if (abort_requested(h)) return true;
        int64_t left = end - now_ns();
        if (left <= 0) return false;
        sleep_ns(left < 1000000 ? left : 1000000);
    }
}

static int emit(sim_job *j, RKLLMResult *r, LLMCallState st) {
    count_add(C_CALLBACKS, 1);
    return j->cb ? j->cb(r, j->userdata, st) : 0;
}

/* The deterministic reply text; *err_at receives the token index of a forced ERROR, or -1. */
static char *build_reply(const sim_job *j, const char *tools, bool custom, bool think, bool lora_prefix, int *err_at) {
    sbuf out = {0};
    const char *prompt = j->reply_prompt ? j->reply_prompt : "";
    bool text = j->input_type == RKLLM_INPUT_PROMPT;
    *err_at = -1;
    if (think && j->prompt && (custom ? j->custom_thinks : j->enable_thinking))
        sb_addf(&out, "<think>\nThe user wrote %zu tokens.\n</think>\n\n", count_tokens(j->prompt));
    if (text && strstr(prompt, "[[sim:error]]")) *err_at = 2;
    if (text && tools && strcmp(j->role, "user") == 0 && reply_tool_calls(&out, tools, prompt)) return sb_take(&out);
    if (text && (reply_json_schema(&out, prompt) || reply_count(&out, prompt))) return sb_take(&out);
    if (text && strcmp(j->role, "tool") == 0) {
        sb_adds(&out, "Tool result: ");
        sb_adds(&out, prompt);
        return sb_take(&out);
    }
    const char *tr = text ? strstr(prompt, "<tool_response>\n") : NULL;
    if (tr) { /* results rendered into a user turn by a custom template: answer with the first one */
        tr += strlen("<tool_response>\n");
        const char *te = strstr(tr, "\n</tool_response>");
        sb_adds(&out, "Tool result: ");
        sb_add(&out, tr, te ? (size_t)(te - tr) : strlen(tr));
        return sb_take(&out);
    }
    size_t len = strlen(prompt), cut = len < 160 ? len : 160;
    while (cut > 0 && cut < len && ((unsigned char)prompt[cut] & 0xC0) == 0x80) cut--;
    if (lora_prefix) sb_addf(&out, "[lora:%s] ", j->lora);
    if (j->images) sb_adds(&out, j->images);
    sb_adds(&out, "Echo: ");
    sb_add(&out, prompt, cut);
    sb_adds(&out, " \xE2\x80\x94 ok.");
    return sb_take(&out);
}

/* Number of leading tokens that lie entirely within the first `bytes` bytes. */
static size_t tokens_within(const int *lens, size_t n, size_t bytes) {
    size_t off = 0, k = 0;
    while (k < n && off + (size_t)lens[k] <= bytes) off += (size_t)lens[k++];
    return k;
}

/* The simulated embedding model: rows[total * SIM_HIDDEN_SIZE] for the text tokens (lens[0..ntext) of
 * text) followed by the job's other tokens (ids, embeddings, images); see the top comment. */
static void hidden_rows(const sim_job *j, const char *text, const int *lens, size_t ntext, size_t total,
                        float *rows) {
    sim_span *words;
    size_t nw = find_words(text, ntext ? strlen(text) : 0, &words), w = 0, units = 0, off = 0;
    float acc[SIM_HIDDEN_SIZE] = {0};
    for (size_t t = 0; t < total; t++) {
        float *row = rows + t * SIM_HIDDEN_SIZE;
        uint64_t own = id_key(0); /* the vector of this token's id, for a row without units yet */
        if (t < ntext) {
            own = id_key(token_id_of(text + off, (size_t)lens[t]));
            off += (size_t)lens[t];
            for (; w < nw && words[w].start + words[w].len <= off; w++, units++)
                add_unit_vector(acc, word_key(text + words[w].start, words[w].len));
        } else if (j->ids) {
            own = id_key(j->ids[t - ntext]);
            add_unit_vector(acc, own);
            units++;
        }
        if (units)
            memcpy(row, acc, sizeof acc);
        else {
            memset(row, 0, sizeof acc);
            add_unit_vector(row, own);
        }
        double norm = 0;
        for (size_t k = 0; k < SIM_HIDDEN_SIZE; k++) norm += (double)row[k] * row[k];
        norm = sqrt_pos(norm);
        if (norm > 0)
            for (size_t k = 0; k < SIM_HIDDEN_SIZE; k++) row[k] = (float)(row[k] / norm);
    }
    free(words);
}

/* The last occurrence of needle in hay, or NULL. */
static const char *find_last(const char *hay, const char *needle) {
    const char *last = NULL;
    for (const char *p = hay; (p = strstr(p, needle)); p++) last = p;
    return last;
}

/* The simulated reranker: how many of the query's distinct words occur in the document (0..1), as a
 * Qwen3-Reranker prompt lays them out in the context; see the top comment. */
static double rerank_overlap(const char *ctx) {
    const char *q = find_last(ctx, "<Query>:"), *d = find_last(ctx, "<Document>:");
    if (!q) return 0;
    q += strlen("<Query>:");
    d = d ? d + strlen("<Document>:") : "";
    const char *qe = strstr(q, "\n<Document>:"), *de = strstr(d, "<|");
    uint64_t *qk, *dk;
    size_t nq = distinct_word_keys(q, qe ? (size_t)(qe - q) : strlen(q), &qk);
    size_t nd = distinct_word_keys(d, de ? (size_t)(de - d) : strlen(d), &dk), hits = 0;
    for (size_t i = 0; nd && i < nq; i++) hits += bsearch(&qk[i], dk, nd, sizeof *dk, cmp_u64) != NULL;
    free(qk);
    free(dk);
    return nq ? (double)hits / (double)nq : 0;
}

/* Hidden-state / logits modes: one NORMAL callback carrying the buffer, freed once it returns (a 1.3
 * callback's 2, "release the buffer early", needs nothing more). Returns the callback's value.
 * context: the KV cache's text after the prefill (the reranker reads it), or NULL. */
static int emit_tensor(sim_job *j, const char *prefill, const int *lens, size_t ntext, size_t total,
                       const char *reply, const char *context, int yes_token, int no_token) {
    RKLLMResult r;
    memset(&r, 0, sizeof r);
    float *buf;
    if (j->mode == RKLLM_INFER_GET_LAST_HIDDEN_LAYER) {
        buf = xmalloc((total ? total : 1) * SIM_HIDDEN_SIZE * sizeof *buf);
        hidden_rows(j, prefill, lens, ntext, total, buf);
        r.last_hidden_layer.hidden_states = buf;
        r.last_hidden_layer.embd_size = SIM_HIDDEN_SIZE;
        r.last_hidden_layer.num_tokens = (int)total;
    } else {
        buf = xmalloc(SIM_VOCAB * sizeof *buf);
        memset(buf, 0, SIM_VOCAB * sizeof *buf);
        if (yes_token >= 0 && no_token >= 0) {
            float yes = (float)(8.0 * rerank_overlap(context ? context : "") - 4.0);
            buf[yes_token] = yes;
            buf[no_token] = -yes;
        } else
            buf[token_id_of(reply, strlen(reply) < 4 ? strlen(reply) : 4)] = 10.0f;
        r.logits.logits = buf;
        r.logits.vocab_size = (int)SIM_VOCAB;
        r.logits.num_tokens = 1;
    }
    int ret = emit(j, &r, RKLLM_RUN_NORMAL);
    free(buf);
    return ret;
}

static void *run_worker(void *arg) {
    sim_job *j = arg;
    sim_handle *h = j->h;
    int64_t t_start = now_ns();
    RKLLMResult res;
    memset(&res, 0, sizeof res);
    bool text_input = j->prompt != NULL;

    /* 1. the prefill text, under the lock (template state may change concurrently) */
    sbuf pre = {0};
    size_t sys_bytes = 0;
    lock();
    bool was_empty = h->kv.n == 0;
    if (text_input) {
        if (was_empty) {
            append_system_part(&pre, h);
            sys_bytes = pre.n;
        }
        append_turn(&pre, h, j->role, j->prompt, j->enable_thinking);
    }
    char *tools = xstrdup(h->tools_json);
    char *pcache = (was_empty && text_input) ? xstrdup(h->pcache_text) : NULL;
    bool custom = h->custom_template, think = h->think;
    int yes_token = h->yes_token, no_token = h->no_token;
    bool reranker = j->mode == RKLLM_INFER_GET_LOGITS && yes_token >= 0 && no_token >= 0;
    if (custom && h->postfix) {
        static const char hdr[] = "<|im_start|>assistant\n";
        size_t pl = strlen(h->postfix), hl = sizeof hdr - 1;
        j->custom_thinks = pl >= hl && strcmp(h->postfix + pl - hl, hdr) == 0;
    }
    size_t max_ctx = (size_t)h->max_context_len;
    int n_keep = h->n_keep;
    float mem_mb = (float)(h->memory_mb >= 0 ? h->memory_mb : (h->model_size + (1 << 20) - 1) >> 20) +
                   (float)h->max_context_len / 1024.0f;
    unlock();

    int *lens = NULL;
    size_t ntext = tokenize(pre.p ? pre.p : "", pre.n, &lens);
    size_t total = ntext + j->extra_tokens, hit = 0;
    size_t sys_tokens = tokens_within(lens, ntext, sys_bytes);
    if (pcache) {
        size_t l = 0;
        while (l < pre.n && pcache[l] == pre.p[l]) l++;
        hit = tokens_within(lens, ntext, l);
    }
    int err_at = -1;
    char *reply = build_reply(j, tools, custom, think, j->lora != NULL, &err_at);
    if (j->err_after >= 0 && (err_at < 0 || j->err_after < err_at)) err_at = j->err_after;

    bool aborted = false, paused = false, errored = false;
    char *context = NULL; /* the KV cache's text after the prefill, when traced or read by a reranker */
    int emitted = 0;
    int64_t t_pre0 = now_ns(), t_pre1 = t_pre0, t_gen0 = t_pre0;
    if (total > max_ctx) {
        sim_log("prompt of %zu tokens exceeds max_context_len %zu", total, max_ctx);
        errored = true;
        err_at = 0;
    } else {
        /* 2. prefill */
        lock();
        kv_make_room(&h->kv, total, max_ctx, n_keep);
        unlock();
        aborted = sleep_abortable(h, (double)(total - hit) * j->set.prefill_ms_per_token);
        t_pre1 = t_gen0 = now_ns();
        if (!aborted) {
            lock();
            size_t off = 0;
            for (size_t i = 0; i < ntext; off += (size_t)lens[i++]) kv_push(&h->kv, pre.p + off, lens[i]);
            for (size_t i = 0; i < j->extra_tokens; i++) kv_push(&h->kv, NULL, 0);
            if (was_empty) h->kv.sys_tokens = sys_tokens;
            G.counters[C_PREFILLED_TOKENS] += (long long)(total - hit);
            G.counters[C_PC_HIT_TOKENS] += (long long)hit;
            char *cache_text = j->save_pcache ? xstrdup(h->kv.text.p ? h->kv.text.p : "") : NULL;
            bool traced = G.set.trace >= 2;
            if (traced || reranker) context = xstrdup(h->kv.text.p ? h->kv.text.p : "");
            unlock();
            if (traced) trace_context(h->id, context);
            if (cache_text && save_prompt_cache(j->pcache_path, h->model_path, h->model_size, cache_text) == 0)
                count_add(C_PC_SAVES, 1);
            free(cache_text);
        }
        /* 3. generation, one token (4 reply bytes) per callback */
        if (!aborted && j->mode != RKLLM_INFER_GENERATE && err_at < 0) {
            paused = emit_tensor(j, pre.p ? pre.p : "", lens, ntext, total, reply, context, yes_token, no_token) == 1;
        } else if (!aborted) {
            size_t rlen = strlen(reply), pos = 0;
            sbuf pending = {0};
            for (;;) {
                if (abort_requested(h)) {
                    aborted = true;
                    break;
                }
                if (err_at >= 0 && emitted >= err_at) break;
                lock();
                bool full = h->kv.n >= max_ctx;
                unlock();
                if (pos >= rlen || full || (j->max_new_tokens > 0 && emitted >= j->max_new_tokens)) break;
                if (sleep_abortable(h, j->set.token_delay_ms)) {
                    aborted = true;
                    break;
                }
                size_t clen = rlen - pos < 4 ? rlen - pos : 4;
                const char *chunk = reply + pos;
                pos += clen;
                lock();
                kv_push(&h->kv, chunk, (int)clen);
                G.counters[C_GENERATED_TOKENS]++;
                unlock();
                emitted++;
                sb_add(&pending, chunk, clen);
                res.token_id = token_id_of(chunk, clen);
                int r;
                if (!j->set.split_utf8_normal && utf8_incomplete_tail(pending.p, pending.n)) {
                    res.text = j->set.waiting_text ? "" : NULL;
                    r = emit(j, &res, RKLLM_RUN_WAITING);
                } else {
                    char *t = sb_take(&pending);
                    res.text = t;
                    r = emit(j, &res, RKLLM_RUN_NORMAL);
                    free(t);
                }
                res.text = NULL;
                if (r == 1) {
                    paused = true;
                    break;
                }
            }
            sb_free(&pending);
        }
        errored = err_at >= 0 && !aborted && !paused;
    }

    /* 4. the end of the run */
    memset(&res, 0, sizeof res);
    if (paused) count_add(C_PAUSES, 1);
    if (errored)
        emit(j, &res, RKLLM_RUN_ERROR);
    else if (!paused && (!aborted || j->set.finish_after_abort)) {
        res.perf.prefill_time_ms = (float)(t_pre1 - t_pre0) / 1e6f;
        res.perf.prefill_tokens = (int)(total - hit);
        res.perf.generate_time_ms = (float)(now_ns() - t_gen0) / 1e6f;
        res.perf.generate_tokens = emitted;
        res.perf.memory_usage_mb = mem_mb;
        emit(j, &res, RKLLM_RUN_FINISH);
    }
    lock();
    if (!paused && !j->keep_history) kv_clear(&h->kv);
    if (errored) G.counters[C_ERRORS]++;
    G.counters[C_BUSY_NS] += now_ns() - t_start;
    G.counters[C_ACTIVE_RUNS]--;
    h->running = false;
    h->abort_flag = false;
    unlock();

    j->ret = errored ? -1 : 0;
    sb_free(&pre);
    free(context);
    free(lens);
    free(tools);
    free(pcache);
    free(reply);
    if (j->async) {
        job_free(j);
        handle_release(h);
    }
    return NULL;
}

/* One line per run, or with n_batch > 1 one line per slot (slot >= 0, with "slot" and "n_batch"). */
static void trace_run(const char *fn, LLMHandle handle, const RKLLMInput *in, const RKLLMInferParam *ip, int slot,
                      int n_batch) {
    sbuf b = {0};
    if (!trace_begin(&b, fn, true, handle)) return;
    if (slot >= 0) {
        tr_int(&b, "slot", slot);
        tr_int(&b, "n_batch", n_batch);
    }
    if (in) {
        tr_str(&b, "role", in->role);
        tr_bool(&b, "enable_thinking", in->enable_thinking);
        tr_int(&b, "input_type", in->input_type);
        if (in->input_type == RKLLM_INPUT_PROMPT)
            tr_str(&b, "prompt", in->prompt_input);
        else if (in->input_type == RKLLM_INPUT_TOKEN)
            tr_int(&b, "n_tokens", (long long)in->token_input.n_tokens);
        else if (in->input_type == RKLLM_INPUT_EMBED)
            tr_int(&b, "n_tokens", (long long)in->embed_input.n_tokens);
        else if (in->input_type == RKLLM_INPUT_MULTIMODAL) {
            tr_str(&b, "prompt", in->multimodal_input.prompt);
            tr_int(&b, "n_image", (long long)SIM_MM_IMAGE(in->multimodal_input).n_image);
            tr_int(&b, "n_image_tokens", (long long)SIM_MM_IMAGE(in->multimodal_input).n_image_tokens);
            tr_int(&b, "image_width", (long long)SIM_MM_IMAGE(in->multimodal_input).image_width);
            tr_int(&b, "image_height", (long long)SIM_MM_IMAGE(in->multimodal_input).image_height);
#if RKLLM_SIM_ABI >= 13
            tr_str(&b, "image_start", in->multimodal_input.image.image_start);
            tr_str(&b, "image_end", in->multimodal_input.image.image_end);
            tr_str(&b, "image_content", in->multimodal_input.image.image_content);
#endif
        }
    } else
        sb_adds(&b, ",\"input\":null");
    if (ip) {
        tr_int(&b, "keep_history", ip->keep_history);
        tr_int(&b, "mode", ip->mode);
        tr_str(&b, "lora", ip->lora_params ? ip->lora_params->lora_adapter_name : NULL);
        tr_key(&b, "prompt_cache");
        if (ip->prompt_cache_params) {
            sb_addf(&b, "{\"save\":%d,\"path\":", ip->prompt_cache_params->save_prompt_cache);
            json_escape(&b, ip->prompt_cache_params->prompt_cache_path);
            sb_adds(&b, "}");
        } else
            sb_adds(&b, "null");
#if RKLLM_SIM_ABI >= 13
        tr_int(&b, "max_new_tokens", ip->max_new_tokens);
        const RKLLMSamplingParam *s = ip->sampling_params;
        tr_key(&b, "sampling");
        if (s) {
            sb_addf(&b, "{\"top_k\":%d", s->top_k);
            tr_num(&b, "top_p", s->top_p);
            tr_num(&b, "temperature", s->temperature);
            tr_num(&b, "repeat_penalty", s->repeat_penalty);
            tr_num(&b, "frequency_penalty", s->frequency_penalty);
            tr_num(&b, "presence_penalty", s->presence_penalty);
            tr_int(&b, "mirostat", s->mirostat);
            tr_num(&b, "mirostat_tau", s->mirostat_tau);
            tr_num(&b, "mirostat_eta", s->mirostat_eta);
            sb_adds(&b, "}");
        } else
            sb_adds(&b, "null");
#endif
    } else
        sb_adds(&b, ",\"infer_param\":null");
    trace_end(&b);
}

/* ------------------------------------------------------------------ multimodal input ---- */

/* How many times "<image>" occurs in s. */
static size_t count_image_tags(const char *s) {
    size_t n = 0;
    for (const char *p = s ? strstr(s, "<image>") : NULL; p; p = strstr(p + 7, "<image>")) n++;
    return n;
}

/* Why a multimodal input breaks the contract (counted in "multimodal_violations"), or NULL. The "model"
 * reads n_image * n_image_tokens rows of hidden_size floats (hidden_size= in the model file). */
static const char *multimodal_refusal(const sim_handle *h, const RKLLMMultiModalInput *mm) {
#if RKLLM_SIM_ABI == 12
    const char *start = h->img_start, *end = h->img_end, *content = h->img_content;
#else
    const char *start = mm->image.image_start, *end = mm->image.image_end, *content = mm->image.image_content;
#endif
    if (!mm->prompt) return "rkllm_run: multimodal prompt is NULL";
    if (count_image_tags(mm->prompt) != SIM_MM_IMAGE(*mm).n_image)
        return "rkllm_run: n_image differs from the number of <image> tags in the prompt";
    if (SIM_MM_IMAGE(*mm).n_image == 0) return NULL;
    if (!SIM_MM_IMAGE(*mm).image_embed || SIM_MM_IMAGE(*mm).n_image_tokens == 0)
        return "rkllm_run: image_embed is NULL or n_image_tokens is 0";
    if (SIM_MM_IMAGE(*mm).image_width == 0 || SIM_MM_IMAGE(*mm).image_height == 0)
        return "rkllm_run: image_width and image_height must not be 0";
    if (!start || !end || !content || !*content)
        return "rkllm_run: the image tags (start, end, content) are not set";
    if (h->hidden_size <= 0) return "rkllm_run: the model takes no images (no hidden_size in its file)";
    return NULL;
}

/* A colour's name from its mean RGB (0-1 scale for uint8 encoders). */
static const char *colour_name(const double rgb[3]) {
    int top = 0;
    double lo = rgb[0], hi = rgb[0];
    for (int k = 1; k < 3; k++) {
        if (rgb[k] > rgb[top]) top = k;
        lo = rgb[k] < lo ? rgb[k] : lo;
        hi = rgb[k] > hi ? rgb[k] : hi;
    }
    if (hi - lo < 0.15) return hi > 0.8 ? "white" : hi < 0.2 ? "black" : "grey";
    static const char *const names[3] = {"red", "green", "blue"};
    return names[top];
}

/* What the "model" sees: per image, the colour of the mean of each token row's first three values
 * (the RKNN simulator's encoder puts a region's mean R, G, B there). */
static char *describe_images(const float *embed, size_t n_image, size_t n_tokens, size_t width) {
    sbuf out = {0};
    sb_adds(&out, n_image == 1 ? "I see " : "I see images: ");
    for (size_t i = 0; i < n_image; i++) {
        double rgb[3] = {0, 0, 0};
        for (size_t t = 0; t < n_tokens; t++)
            for (size_t k = 0; k < 3 && k < width; k++) rgb[k] += embed[(i * n_tokens + t) * width + k];
        for (int k = 0; k < 3; k++) rgb[k] /= (double)n_tokens;
        sb_addf(&out, "%sa mostly %s image", i ? ", " : "", colour_name(rgb));
    }
    sb_adds(&out, ". ");
    return sb_take(&out);
}

/* Copy the caller's input into a job (the caller's buffers may vanish after run_async returns). */
static sim_job *job_from_input(const sim_handle *h, const RKLLMInput *in, const RKLLMInferParam *ip,
                               const char **why) {
    if (!in || !ip) {
        *why = "rkllm_run: input and infer_param must not be NULL";
        return NULL;
    }
    const char *role = in->role ? in->role : "user";
    if (strcmp(role, "user") != 0 && strcmp(role, "tool") != 0) {
        *why = "rkllm_run: role must be \"user\" or \"tool\"";
        return NULL;
    }
    if (ip->mode < RKLLM_INFER_GENERATE || ip->mode > RKLLM_INFER_GET_LOGITS) {
        *why = "rkllm_run: unknown infer mode";
        return NULL;
    }
    sim_job *j = xmalloc(sizeof *j);
    memset(j, 0, sizeof *j);
    j->input_type = in->input_type;
    j->role = xstrdup(role);
    j->enable_thinking = in->enable_thinking;
    j->mode = ip->mode;
    j->keep_history = ip->keep_history;
    char buf[64];
    switch (in->input_type) {
    case RKLLM_INPUT_PROMPT:
        if (!in->prompt_input) *why = "rkllm_run: prompt_input is NULL";
        j->prompt = xstrdup(in->prompt_input);
        j->reply_prompt = xstrdup(in->prompt_input);
        break;
    case RKLLM_INPUT_TOKEN:
        if (!in->token_input.input_ids || in->token_input.n_tokens == 0) *why = "rkllm_run: empty token input";
        j->extra_tokens = in->token_input.n_tokens;
        if (!*why) {
            j->ids = xmalloc(j->extra_tokens * sizeof *j->ids);
            memcpy(j->ids, in->token_input.input_ids, j->extra_tokens * sizeof *j->ids);
        }
        snprintf(buf, sizeof buf, "<%zu tokens>", in->token_input.n_tokens);
        j->reply_prompt = xstrdup(buf);
        break;
    case RKLLM_INPUT_EMBED:
        if (!in->embed_input.embed || in->embed_input.n_tokens == 0) *why = "rkllm_run: empty embedding input";
        j->extra_tokens = in->embed_input.n_tokens;
        j->reply_prompt = xstrdup("<embed>");
        break;
    case RKLLM_INPUT_MULTIMODAL: {
        const RKLLMMultiModalInput *mm = &in->multimodal_input;
        j->prompt = xstrdup(mm->prompt ? mm->prompt : "");
        j->reply_prompt = xstrdup(j->prompt);
        j->extra_tokens = SIM_MM_IMAGE(*mm).n_image * SIM_MM_IMAGE(*mm).n_image_tokens;
        if ((*why = multimodal_refusal(h, mm)) != NULL)
            count_add(C_MULTIMODAL_VIOLATIONS, 1);
        else if (SIM_MM_IMAGE(*mm).n_image > 0)
            j->images = describe_images(SIM_MM_IMAGE(*mm).image_embed, SIM_MM_IMAGE(*mm).n_image,
                                        SIM_MM_IMAGE(*mm).n_image_tokens, (size_t)h->hidden_size);
#if RKLLM_SIM_ABI >= 13
        j->extra_tokens += mm->video.n_video * mm->video.n_frame_per_video * mm->video.n_frame_tokens;
#endif
        break;
    }
    default: *why = "rkllm_run: unknown input type";
    }
    if (ip->lora_params && ip->lora_params->lora_adapter_name) j->lora = xstrdup(ip->lora_params->lora_adapter_name);
    if (ip->prompt_cache_params && ip->prompt_cache_params->save_prompt_cache &&
        ip->prompt_cache_params->prompt_cache_path) {
        j->save_pcache = true;
        j->pcache_path = xstrdup(ip->prompt_cache_params->prompt_cache_path);
    }
#if RKLLM_SIM_ABI >= 13
    j->max_new_tokens = ip->max_new_tokens;
#endif
    if (*why) {
        job_free(j);
        return NULL;
    }
    return j;
}

/* ------------------------------------------------------------------- batched runs ---- */

/* One slot of a batched run: its job (input), its prefill and its reply's progress. */
typedef struct {
    sim_job *j;
    sbuf pre, pending;
    int *lens;
    size_t ntext, total, hit, sys_bytes, rlen, pos;
    char *reply;
    int err_at, emitted;
    bool was_empty, done;
} sim_slot;

/* A batched run (n_batch > 1): one RKLLMInferParam for n slots, one callback per step for all of them. */
typedef struct {
    sim_handle *h;
    bool async;
    int n;
    sim_slot *slots;
    LLMResultCallback cb;
    void *userdata;
    sim_settings set; /* snapshot taken when the run starts */
    int err_after, max_new_tokens, ret;
    /* filled by the worker */
    char *tools, *pcache;
    bool custom, think;
    size_t max_ctx;
    int n_keep;
    float mem_mb;
    int64_t t_pre0, t_pre1, t_gen0;
} sim_batch;

static void batch_free(sim_batch *b) {
    for (int i = 0; i < b->n; i++) {
        sim_slot *s = &b->slots[i];
        if (s->j) job_free(s->j);
        sb_free(&s->pre);
        sb_free(&s->pending);
        free(s->lens);
        free(s->reply);
    }
    free(b->slots);
    free(b->tools);
    free(b->pcache);
    free(b);
}

/* What the batched contract does not cover (refused, not guessed at); NULL if the run may start. */
static const char *batch_refusal(const RKLLMInferParam *ip) {
    if (ip->keep_history) return "rkllm_run: keep_history must be 0 with n_batch > 1 (per-slot history is undocumented)";
    if (ip->mode != RKLLM_INFER_GENERATE) return "rkllm_run: only text generation is simulated with n_batch > 1";
    if (ip->prompt_cache_params && ip->prompt_cache_params->save_prompt_cache)
        return "rkllm_run: saving a prompt cache is not simulated with n_batch > 1";
    return NULL;
}

/* Copy the n inputs (an array of RKLLMInput) into jobs; NULL and *why if any is invalid. */
static sim_batch *batch_from_input(const sim_handle *h, const RKLLMInput *in, const RKLLMInferParam *ip,
                                   const char **why) {
    if (!in || !ip) {
        *why = "rkllm_run: input and infer_param must not be NULL";
        return NULL;
    }
    if ((*why = batch_refusal(ip)) != NULL) return NULL;
    sim_batch *b = xmalloc(sizeof *b);
    memset(b, 0, sizeof *b);
    b->n = h->n_batch;
    b->slots = xmalloc((size_t)b->n * sizeof *b->slots);
    memset(b->slots, 0, (size_t)b->n * sizeof *b->slots);
    for (int i = 0; i < b->n && !*why; i++) b->slots[i].j = job_from_input(h, in + i, ip, why);
    if (*why) {
        batch_free(b);
        return NULL;
    }
    return b;
}

static bool lora_loaded_locked(const sim_handle *h, const char *name) {
    for (size_t i = 0; i < h->n_loras; i++)
        if (strcmp(h->loras[i].name, name) == 0) return true;
    return false;
}

/* 1. Every slot's prefill text (under the lock: template state may change concurrently), reply and error point. */
static void batch_prepare(sim_batch *b) {
    sim_handle *h = b->h;
    lock();
    for (int i = 0; i < b->n; i++) {
        sim_slot *s = &b->slots[i];
        s->was_empty = kv_of(h, i)->n == 0;
        if (s->j->prompt) {
            if (s->was_empty) {
                append_system_part(&s->pre, h);
                s->sys_bytes = s->pre.n;
            }
            append_turn(&s->pre, h, s->j->role, s->j->prompt, s->j->enable_thinking);
        }
        if (h->custom_template && h->postfix) {
            static const char hdr[] = "<|im_start|>assistant\n";
            size_t pl = strlen(h->postfix), hl = sizeof hdr - 1;
            s->j->custom_thinks = pl >= hl && strcmp(h->postfix + pl - hl, hdr) == 0;
        }
    }
    b->tools = xstrdup(h->tools_json);
    b->pcache = xstrdup(h->pcache_text);
    b->custom = h->custom_template;
    b->think = h->think;
    b->max_ctx = (size_t)h->max_context_len;
    b->n_keep = h->n_keep;
    b->mem_mb = (float)(h->memory_mb >= 0 ? h->memory_mb : (h->model_size + (1 << 20) - 1) >> 20) +
                (float)b->n * (float)h->max_context_len / 1024.0f; /* n caches */
    unlock();
    for (int i = 0; i < b->n; i++) {
        sim_slot *s = &b->slots[i];
        s->ntext = tokenize(s->pre.p ? s->pre.p : "", s->pre.n, &s->lens);
        s->total = s->ntext + s->j->extra_tokens;
        if (b->pcache && s->was_empty && s->j->prompt) {
            size_t l = 0;
            while (l < s->pre.n && b->pcache[l] == s->pre.p[l]) l++;
            s->hit = tokens_within(s->lens, s->ntext, l);
        }
        s->reply = build_reply(s->j, b->tools, b->custom, b->think, s->j->lora != NULL, &s->err_at);
        s->rlen = strlen(s->reply);
        if (b->err_after >= 0 && (s->err_at < 0 || b->err_after < s->err_at)) s->err_at = b->err_after;
    }
}

/* 2. Prefill the slots one after another (each costs what a single run's prefill costs). True if aborted. */
static bool batch_prefill(sim_batch *b) {
    sim_handle *h = b->h;
    for (int i = 0; i < b->n; i++) {
        sim_slot *s = &b->slots[i];
        sim_kv *kv = kv_of(h, i);
        lock();
        kv_make_room(kv, s->total, b->max_ctx, b->n_keep);
        unlock();
        if (sleep_abortable(h, (double)(s->total - s->hit) * b->set.prefill_ms_per_token)) return true;
        lock();
        size_t off = 0;
        for (size_t t = 0; t < s->ntext; off += (size_t)s->lens[t++]) kv_push(kv, s->pre.p + off, s->lens[t]);
        for (size_t t = 0; t < s->j->extra_tokens; t++) kv_push(kv, NULL, 0);
        if (s->was_empty) kv->sys_tokens = tokens_within(s->lens, s->ntext, s->sys_bytes);
        G.counters[C_PREFILLED_TOKENS] += (long long)(s->total - s->hit);
        G.counters[C_PC_HIT_TOKENS] += (long long)s->hit;
        bool traced = G.set.trace >= 2;
        char *context = traced ? xstrdup(kv->text.p ? kv->text.p : "") : NULL;
        unlock();
        if (traced) trace_context(h->id, context);
        free(context);
    }
    return false;
}

/* Which slots still generate; -1 if a slot reached its forced error, else how many are active. */
static int batch_active(sim_batch *b) {
    int active = 0;
    lock();
    for (int i = 0; i < b->n; i++) {
        sim_slot *s = &b->slots[i];
        if (s->done) continue;
        if (s->err_at >= 0 && s->emitted >= s->err_at) {
            active = -1;
            break;
        }
        if (s->pos >= s->rlen || kv_of(b->h, i)->n >= b->max_ctx ||
            (b->max_new_tokens > 0 && s->emitted >= b->max_new_tokens))
            s->done = true;
        else
            active++;
    }
    unlock();
    return active;
}

/* One step: the next token of every active slot, all in one callback (an array of n results). A finished slot
 * has token_id -1 and text NULL; a slot whose text ends inside a UTF-8 character holds it back (text NULL, or ""
 * with waiting_text) unless split_utf8_normal; the state is WAITING when every slot of the step holds back.
 * Returns the callback's value. */
static int batch_step(sim_batch *b, RKLLMResult *res, char **texts) {
    int produced = 0, held = 0;
    memset(res, 0, (size_t)b->n * sizeof *res);
    for (int i = 0; i < b->n; i++) {
        sim_slot *s = &b->slots[i];
        if (s->done) {
            res[i].token_id = -1;
            continue;
        }
        size_t clen = s->rlen - s->pos < 4 ? s->rlen - s->pos : 4;
        const char *chunk = s->reply + s->pos;
        s->pos += clen;
        lock();
        kv_push(kv_of(b->h, i), chunk, (int)clen);
        G.counters[C_GENERATED_TOKENS]++;
        unlock();
        s->emitted++;
        produced++;
        sb_add(&s->pending, chunk, clen);
        res[i].token_id = token_id_of(chunk, clen);
        if (!b->set.split_utf8_normal && utf8_incomplete_tail(s->pending.p, s->pending.n)) {
            res[i].text = b->set.waiting_text ? "" : NULL;
            held++;
        } else
            res[i].text = texts[i] = sb_take(&s->pending);
    }
    count_add(C_BATCH_STEPS, 1);
    count_add(C_CALLBACKS, 1);
    int r = b->cb ? b->cb(res, b->userdata, held == produced ? RKLLM_RUN_WAITING : RKLLM_RUN_NORMAL) : 0;
    for (int i = 0; i < b->n; i++) {
        free(texts[i]);
        texts[i] = NULL;
    }
    return r;
}

/* 3. Generation. A step costs token_delay_ms * (1 + batch_step_cost * (active slots - 1)).
 * *outcome: 0 all slots finished, 1 aborted, 2 paused (the callback returned 1), 3 a forced error. */
static void batch_generate(sim_batch *b, int *outcome) {
    RKLLMResult *res = xmalloc((size_t)b->n * sizeof *res);
    char **texts = xmalloc((size_t)b->n * sizeof *texts);
    memset(texts, 0, (size_t)b->n * sizeof *texts);
    *outcome = 0;
    for (;;) {
        if (abort_requested(b->h)) {
            *outcome = 1;
            break;
        }
        int active = batch_active(b);
        if (active < 0) *outcome = 3;
        if (active <= 0) break;
        if (sleep_abortable(b->h, b->set.token_delay_ms * (1.0 + b->set.batch_step_cost * (active - 1)))) {
            *outcome = 1;
            break;
        }
        if (batch_step(b, res, texts) == 1) {
            *outcome = 2;
            break;
        }
    }
    free(texts);
    free(res);
}

/* 4. The closing callback. Shape (setting batch_finish): 0 an array of n results, each slot's own perf;
 * 1 one result with the run's totals, followed in memory by poison results (token_id > 0, text SIM_POISON) that a
 * binding reading an array would deliver as text; 2 no FINISH at all (the return is the end; ERROR as 0). */
static void batch_close(sim_batch *b, LLMCallState st) {
    int shape = (int)b->set.batch_finish;
    if (st == RKLLM_RUN_FINISH && shape == 2) return;
    RKLLMResult *res = xmalloc((size_t)b->n * sizeof *res);
    memset(res, 0, (size_t)b->n * sizeof *res);
    float gen_ms = (float)(now_ns() - b->t_gen0) / 1e6f, pre_ms = (float)(b->t_pre1 - b->t_pre0) / 1e6f;
    for (int i = 0; i < b->n; i++) {
        sim_slot *s = &b->slots[i];
        RKLLMResult *r = shape == 1 ? &res[0] : &res[i];
        r->token_id = -1;
        r->perf.prefill_time_ms = pre_ms;
        r->perf.prefill_tokens += (int)(s->total - s->hit);
        r->perf.generate_time_ms = gen_ms;
        r->perf.generate_tokens += s->emitted;
        r->perf.memory_usage_mb = b->mem_mb;
    }
    for (int i = 1; shape == 1 && i < b->n; i++) {
        res[i].text = SIM_POISON;
        res[i].token_id = 0x5eed;
        res[i].perf.prefill_tokens = res[i].perf.generate_tokens = -777;
    }
    count_add(C_CALLBACKS, 1);
    if (b->cb) b->cb(res, b->userdata, st);
    free(res);
}

static void *batch_worker(void *arg) {
    sim_batch *b = arg;
    sim_handle *h = b->h;
    int64_t t_start = now_ns();
    batch_prepare(b);
    int outcome = 0; /* see batch_generate */
    bool too_long = false;
    for (int i = 0; i < b->n; i++) too_long = too_long || b->slots[i].total > b->max_ctx;
    b->t_pre0 = b->t_pre1 = b->t_gen0 = now_ns();
    if (too_long) {
        sim_log("a slot's prompt exceeds max_context_len %zu", b->max_ctx);
        outcome = 3;
    } else if (batch_prefill(b)) {
        outcome = 1;
        b->t_pre1 = b->t_gen0 = now_ns();
    } else {
        b->t_pre1 = b->t_gen0 = now_ns();
        batch_generate(b, &outcome);
    }
    bool forced = false; /* like a single run: a pending one-shot or [[sim:error]] fails a run that ends normally */
    for (int i = 0; i < b->n; i++) forced = forced || b->slots[i].err_at >= 0;
    bool errored = outcome == 3 || (outcome == 0 && forced);
    if (outcome == 2) count_add(C_PAUSES, 1);
    if (errored)
        batch_close(b, RKLLM_RUN_ERROR);
    else if (outcome == 0 || (outcome == 1 && b->set.finish_after_abort))
        batch_close(b, RKLLM_RUN_FINISH);
    lock();
    for (int i = 0; outcome != 2 && i < b->n; i++) kv_clear(kv_of(h, i)); /* keep_history is always 0 */
    if (errored) G.counters[C_ERRORS]++;
    G.counters[C_BUSY_NS] += now_ns() - t_start;
    G.counters[C_ACTIVE_RUNS]--;
    h->running = false;
    h->abort_flag = false;
    unlock();
    b->ret = errored ? -1 : 0;
    if (b->async) {
        batch_free(b);
        handle_release(h);
    }
    return NULL;
}

/* rkllm_run / rkllm_run_async on a handle with n_batch > 1: `in` is an array of n_batch inputs. */
/* Whether a run on h must be refused (called with the lock held): a bad input (why), a destroyed
 * handle or a run already going. Counts the cause and puts what to log in msg (empty: nothing). */
static bool run_refused_locked(const char *fn, const sim_handle *h, const char *why, bool batched, char *msg,
                               size_t cap) {
    msg[0] = '\0';
    if (why) {
        G.counters[C_ERRORS]++;
        if (batched) G.counters[C_BATCH_REFUSALS]++;
        snprintf(msg, cap, "%s", why);
    } else if (G.table[h->id] != h) {
        G.counters[C_INVALID_HANDLE_CALLS]++;
    } else if (h->running) {
        G.counters[C_CONCURRENT_RUN_VIOLATIONS]++;
        snprintf(msg, cap, "%s: a run is already active on this handle", fn);
    } else {
        return false;
    }
    return true;
}

/* A run starts on h (called with the lock held). */
static void begin_run_locked(sim_handle *h) {
    h->running = true;
    h->abort_flag = false;
    G.counters[C_RUNS]++;
    if (++G.counters[C_ACTIVE_RUNS] > G.counters[C_MAX_ACTIVE_RUNS])
        G.counters[C_MAX_ACTIVE_RUNS] = G.counters[C_ACTIVE_RUNS];
}

static int job_done(void *arg) {
    sim_job *j = arg;
    int ret = j->ret;
    job_free(j);
    return ret;
}

static int batch_done(void *arg) {
    sim_batch *b = arg;
    int ret = b->ret;
    batch_free(b);
    return ret;
}

/* Run worker(arg) on a thread of its own: detached when async (the worker then frees arg and releases the
 * handle), else joined, and done(arg) frees it and gives the run's result. */
static int launch(const char *fn, sim_handle *h, void *(*worker)(void *), void *arg, bool async, int (*done)(void *)) {
    pthread_t t;
    if (pthread_create(&t, NULL, worker, arg) != 0) {
        lock();
        h->running = false;
        G.counters[C_ACTIVE_RUNS]--;
        G.counters[C_ERRORS]++;
        unlock();
        sim_log("%s: cannot start a worker thread", fn);
        done(arg);
        handle_release(h);
        return -1;
    }
    if (async) {
        pthread_detach(t);
        return 0;
    }
    pthread_join(t, NULL);
    int ret = done(arg);
    handle_release(h);
    return ret;
}

static int start_batch(const char *fn, sim_handle *h, RKLLMInput *in, RKLLMInferParam *ip, void *userdata,
                       bool async) {
    const char *why = NULL;
    sim_batch *b = batch_from_input(h, in, ip, &why);
    lock();
    if (b && b->slots[0].j->lora && !lora_loaded_locked(h, b->slots[0].j->lora))
        why = "rkllm_run: the requested LoRA adapter is not loaded";
    char msg[512];
    if (run_refused_locked(fn, h, why, true, msg, sizeof msg)) {
        unlock();
        if (msg[0]) sim_log("%s", msg);
        if (b) batch_free(b);
        handle_release(h);
        return -1;
    }
    b->h = h;
    b->async = async;
    b->cb = h->cb;
    b->userdata = userdata ? userdata : h->cb_userdata;
    b->max_new_tokens = b->slots[0].j->max_new_tokens > 0 ? b->slots[0].j->max_new_tokens : h->max_new_tokens;
    b->set = G.set;
    b->err_after = G.set.error_after_tokens >= 0 ? (int)G.set.error_after_tokens : -1;
    G.set.error_after_tokens = -1; /* one-shot */
    G.counters[C_BATCHED_RUNS]++;
    begin_run_locked(h);
    unlock();
    return launch(fn, h, batch_worker, b, async, batch_done);
}

static int start_run(const char *fn, LLMHandle handle, RKLLMInput *in, RKLLMInferParam *ip, void *userdata,
                     bool async) {
    sim_handle *h = handle_acquire(handle);
    int n = (h && in) ? h->n_batch : 1; /* n_batch never changes after init */
    for (int i = 0; i < n; i++) trace_run(fn, handle, in ? in + i : NULL, ip, n > 1 ? i : -1, n);
    if (!h) return -1;
    if (n > 1) return start_batch(fn, h, in, ip, userdata, async);
    const char *why = NULL;
    sim_job *j = job_from_input(h, in, ip, &why);
    lock();
    if (j && j->lora && !lora_loaded_locked(h, j->lora)) why = "rkllm_run: the requested LoRA adapter is not loaded";
    char msg[512];
    if (run_refused_locked(fn, h, why, false, msg, sizeof msg)) {
        unlock();
        if (msg[0]) sim_log("%s", msg);
        if (j) job_free(j);
        handle_release(h);
        return -1;
    }
    j->h = h;
    j->async = async;
    j->cb = h->cb;
    j->userdata = userdata ? userdata : h->cb_userdata;
    if (j->max_new_tokens <= 0) j->max_new_tokens = h->max_new_tokens;
    j->set = G.set;
    j->err_after = G.set.error_after_tokens >= 0 ? (int)G.set.error_after_tokens : -1;
    G.set.error_after_tokens = -1; /* one-shot */
    begin_run_locked(h);
    unlock();
    return launch(fn, h, run_worker, j, async, job_done);
}

SIM_API int rkllm_run(LLMHandle handle, RKLLMInput *in, RKLLMInferParam *ip, void *userdata) {
    return start_run("rkllm_run", handle, in, ip, userdata, false);
}

SIM_API int rkllm_run_async(LLMHandle handle, RKLLMInput *in, RKLLMInferParam *ip, void *userdata) {
    return start_run("rkllm_run_async", handle, in, ip, userdata, true);
}

SIM_API int rkllm_abort(LLMHandle handle) {
    trace_simple("rkllm_abort", handle);
    sim_handle *h = handle_acquire(handle);
    if (!h) return -1;
    lock();
    if (h->running) {
        h->abort_flag = true;
        G.counters[C_ABORTS]++;
    }
    unlock();
    handle_release(h);
    return 0;
}

SIM_API int rkllm_is_running(LLMHandle handle) {
    trace_simple("rkllm_is_running", handle);
    sim_handle *h = handle_acquire(handle);
    if (!h) return -1;
    lock();
    bool running = h->running;
    unlock();
    handle_release(h);
#if RKLLM_SIM_ABI >= 13
    return running ? 1 : 0;
#else
    return running ? 0 : 1; /* the 1.2 header: 0 if a task is running, non-zero otherwise */
#endif
}

SIM_API int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int *start_pos, int *end_pos) {
    sbuf b = {0};
    if (trace_begin(&b, "rkllm_clear_kv_cache", true, handle)) {
        tr_int(&b, "keep_system_prompt", keep_system_prompt);
        if (start_pos && end_pos) {
            tr_int(&b, "start_pos", start_pos[0]);
            tr_int(&b, "end_pos", end_pos[0]);
        }
        trace_end(&b);
    }
    sim_handle *h = handle_acquire(handle);
    if (!h) return -1;
    int rc = 0;
    lock();
    for (int i = 0; !h->running && i < h->n_batch; i++) { /* the arrays hold one entry per slot */
        sim_kv *kv = kv_of(h, i);
        if (start_pos && end_pos && start_pos[i] < end_pos[i])
            kv_remove(kv, start_pos[i] > 0 ? (size_t)start_pos[i] : 0, (size_t)end_pos[i]);
        else if (keep_system_prompt)
            kv_remove(kv, kv->sys_tokens, kv->n);
        else
            kv_clear(kv);
    }
    if (h->running) rc = -1;
    if (rc == 0) G.counters[C_KV_CLEARS]++;
    unlock();
    if (rc) sim_log("rkllm_clear_kv_cache: the handle is running");
    handle_release(h);
    return rc;
}

SIM_API int rkllm_get_kv_cache_size(LLMHandle handle, int *cache_sizes) {
    trace_simple("rkllm_get_kv_cache_size", handle);
    sim_handle *h = handle_acquire(handle);
    if (!h) return -1;
    if (cache_sizes) {
        lock();
        for (int i = 0; i < h->n_batch; i++) cache_sizes[i] = (int)kv_of(h, i)->n;
        unlock();
    }
    handle_release(h);
    return cache_sizes ? 0 : -1;
}

SIM_API int rkllm_set_chat_template(LLMHandle handle, const char *system_prompt, const char *prefix,
                                    const char *postfix) {
    sbuf b = {0};
    if (trace_begin(&b, "rkllm_set_chat_template", true, handle)) {
        tr_str(&b, "system_prompt", system_prompt);
        tr_str(&b, "prompt_prefix", prefix);
        tr_str(&b, "prompt_postfix", postfix);
        trace_end(&b);
    }
    sim_handle *h = handle_acquire(handle);
    if (!h) return -1;
    char *declared = tools_from_template_text(system_prompt ? system_prompt : "");
    lock();
    free(h->system_prompt);
    free(h->prefix);
    free(h->postfix);
    free(h->tools_json);
    h->custom_template = true;
    h->system_prompt = xstrdup(system_prompt ? system_prompt : "");
    h->prefix = xstrdup(prefix ? prefix : "");
    h->postfix = xstrdup(postfix ? postfix : "");
    h->tools_json = declared; /* tools a Qwen-style template lists in <tools>...</tools>, or NULL */
    G.counters[C_TEMPLATE_SETS]++;
    unlock();
    handle_release(h);
    return 0;
}

SIM_API int rkllm_set_function_tools(LLMHandle handle, const char *system_prompt, const char *tools,
                                     const char *tool_response_str) {
    sbuf b = {0};
    if (trace_begin(&b, "rkllm_set_function_tools", true, handle)) {
        tr_str(&b, "system_prompt", system_prompt);
        tr_str(&b, "tools", tools);
        tr_str(&b, "tool_response_str", tool_response_str);
        trace_end(&b);
    }
    sim_handle *h = handle_acquire(handle);
    if (!h) return -1;
    const char *t = tools ? tools : "";
    jv *arr = json_parse(t, strlen(t), false);
    int rc = (arr && arr->type == JV_ARR) ? 0 : -1;
    if (rc == 0) {
        lock();
        free(h->system_prompt);
        free(h->tools_json);
        free(h->tool_tag);
        h->custom_template = false;
        h->system_prompt = xstrdup(system_prompt ? system_prompt : "");
        h->tools_json = arr->n ? xstrdup(t) : NULL;
        h->tool_tag = (tool_response_str && *tool_response_str) ? xstrdup(tool_response_str) : NULL;
        G.counters[C_TOOLS_SETS]++;
        unlock();
    } else
        sim_log("rkllm_set_function_tools: tools must be a JSON array");
    jv_free(arr);
    handle_release(h);
    return rc;
}

SIM_API int rkllm_set_cross_attn_params(LLMHandle handle, RKLLMCrossAttnParam *cross_attn_params) {
    (void)cross_attn_params;
    trace_simple("rkllm_set_cross_attn_params", handle);
    sim_handle *h = handle_acquire(handle);
    if (!h) return -1;
    handle_release(h);
    return 0;
}

/* -------------------------------------------------------------- simulator controls ---- */

SIM_API long long rkllm_sim_counter(const char *name) {
    for (int i = 0; name && i < C_COUNT; i++)
        if (strcmp(name, counter_names[i]) == 0) {
            lock();
            long long v = G.counters[i];
            unlock();
            return v;
        }
    return -1;
}

/* RKLLM_SIM_REPORT=<path>: when the library is unloaded (process exit), write every counter there as
 * one JSON object, so a test can check a whole subprocess for leaked handles or overlapping runs. */
__attribute__((destructor)) static void write_exit_report(void) {
    const char *path = getenv("RKLLM_SIM_REPORT");
    if (!path || !*path) return;
    FILE *f = fopen(path, "w");
    if (!f) return;
    fputc('{', f);
    for (int i = 0; i < C_COUNT; i++) fprintf(f, "%s\"%s\": %lld", i ? ", " : "", counter_names[i], G.counters[i]);
    fputs("}\n", f);
    fclose(f);
}

SIM_API void rkllm_sim_reset_counters(void) {
    lock();
    for (int i = 0; i < C_COUNT; i++)
        if (i != C_LIVE_HANDLES && i != C_ACTIVE_RUNS && i != C_RESIDENT_HANDLES) G.counters[i] = 0;
    G.counters[C_MAX_ACTIVE_RUNS] = G.counters[C_ACTIVE_RUNS];
    G.counters[C_MAX_RESIDENT_HANDLES] = G.counters[C_RESIDENT_HANDLES];
    unlock();
}

SIM_API int rkllm_sim_set(const char *key, double value) {
    for (size_t i = 0; key && i < sizeof setting_keys / sizeof setting_keys[0]; i++)
        if (strcmp(key, setting_keys[i].name) == 0) {
            lock();
            *(double *)((char *)&G.set + setting_keys[i].off) = value;
            unlock();
            return 0;
        }
    return -1;
}

SIM_API size_t rkllm_sim_trace_read(char *buf, size_t cap) {
    lock();
    size_t total = G.trace.n;
    if (buf && cap && total) memcpy(buf, G.trace.p, cap < total ? cap : total);
    unlock();
    return total;
}

SIM_API void rkllm_sim_trace_clear(void) {
    lock();
    sb_free(&G.trace);
    G.counters[C_TRACE_DROPPED] = 0;
    unlock();
}

#endif /* RKLLM_SIM_DECLARATIONS_ONLY */
