// llama.cpp's greedy continuation of given token ids, printed as token ids — llama.cpp's side of
// issue 20's "the first 32 greedy tokens" comparison (scripts/llamacpp_greedy.sh builds and runs
// it; moescope's side is `generate --token-ids … --json`). Our code, built against the libllama
// of the llama-cpp-python sdist that scripts/make_gguf_fixtures.sh unpacks; nothing of llama.cpp
// is committed.
//
//   llamacpp_greedy MODEL.gguf N_NEW ID,ID,… [fa=on|off|auto] [kv=f16|f32] [ub=N]
//
// Prints one line: up to N_NEW greedy ids, comma-separated, ending at the first end-of-generation
// token (included), as moescope's `generate` ends. The prompt goes in as one batch (as
// llama-perplexity and moescope's prefill take it), then one token at a time; 2 threads.
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static int fail(const char * what) {
    fprintf(stderr, "llamacpp_greedy: %s\n", what);
    return 2;
}

int main(int argc, char ** argv) {
    if (argc < 4) {
        return fail("usage: llamacpp_greedy MODEL.gguf N_NEW ID,ID,... [fa=on|off|auto] [kv=f16|f32] [ub=N]");
    }
    const int n_new = atoi(argv[2]);
    std::vector<llama_token> prompt;
    for (const char * p = argv[3]; *p;) {
        char * end = nullptr;
        long id = strtol(p, &end, 10);
        if (end == p) {
            return fail("token ids must be comma-separated integers");
        }
        prompt.push_back((llama_token) id);
        p = *end == ',' ? end + 1 : end;
    }
    if (prompt.empty() || n_new <= 0) {
        return fail("need at least one prompt id and N_NEW > 0");
    }

    llama_backend_init();
    llama_log_set([](ggml_log_level, const char *, void *) {}, nullptr);
    llama_model_params mp = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        return fail("could not load the model");
    }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = prompt.size() + n_new;
    cp.n_batch = prompt.size();
    cp.n_ubatch = prompt.size();
    cp.n_threads = 2;
    cp.n_threads_batch = 2;
    for (int i = 4; i < argc; i++) {
        const char * a = argv[i];
        if (!strcmp(a, "fa=on")) {
            cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED;
        } else if (!strcmp(a, "fa=off")) {
            cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
        } else if (!strcmp(a, "fa=auto")) {
            cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_AUTO;
        } else if (!strcmp(a, "kv=f32")) {
            cp.type_k = GGML_TYPE_F32;
            cp.type_v = GGML_TYPE_F32;
        } else if (!strcmp(a, "kv=f16")) {
            cp.type_k = GGML_TYPE_F16;
            cp.type_v = GGML_TYPE_F16;
        } else if (!strncmp(a, "ub=", 3)) {
            cp.n_ubatch = atoi(a + 3);
        } else {
            return fail("unknown setting (expected fa=on|off|auto, kv=f16|f32, ub=N)");
        }
    }
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        return fail("could not create a context");
    }
    llama_sampler * greedy = llama_sampler_init_greedy();
    llama_batch batch = llama_batch_get_one(prompt.data(), prompt.size());
    llama_token next = 0;
    std::string out;
    for (int i = 0; i < n_new; i++) {
        if (llama_decode(ctx, batch) != 0) {
            return fail("llama_decode failed");
        }
        next = llama_sampler_sample(greedy, ctx, -1);
        out += (i ? "," : "") + std::to_string(next);
        if (llama_vocab_is_eog(llama_model_get_vocab(model), next)) {
            break;  // as moescope's generate stops
        }
        batch = llama_batch_get_one(&next, 1);
    }
    printf("%s\n", out.c_str());
    llama_sampler_free(greedy);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
