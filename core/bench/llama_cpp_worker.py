"""Runs in the Python of an environment with llama-cpp-python, never imported by kvserve: times llama.cpp on
token-id prompts, all sequences decoding together in one batch as llama.cpp's server slots do (greedy, exactly
--output-len new tokens each), after one untimed warm-up on the first two prompts reversed, and prints one JSON
line. llama-cpp-python's Llama class runs one sequence at a time; this drives llama_decode directly."""
import argparse
import json
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--output-len", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args()
    import llama_cpp as llama

    with open(args.prompts) as f:
        prompts = json.load(f)
    llama.llama_backend_init()
    model = llama.llama_model_load_from_file(args.model.encode(), llama.llama_model_default_params())
    if not model:
        raise SystemExit(f"llama.cpp cannot load {args.model}")
    params = llama.llama_context_default_params()
    params.n_seq_max = len(prompts)
    params.kv_unified = True
    params.n_ctx = sum(map(len, prompts)) + len(prompts) * args.output_len + 256
    params.n_batch = params.n_ubatch = 512
    params.n_threads = params.n_threads_batch = args.threads
    context = llama.llama_init_from_model(model, params)
    vocab_size = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model))
    batch = llama.llama_batch_init(512, 0, len(prompts))

    def decode(entries: list[tuple[int, int, int, bool]]) -> None:
        """(token, position, sequence, wants logits) entries, in llama_decode calls of up to 512 tokens."""
        for start in range(0, len(entries), 512):
            chunk = entries[start:start + 512]
            for i, (token, position, sequence, logits) in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, position, 1
                batch.seq_id[i][0], batch.logits[i] = sequence, logits
            batch.n_tokens = len(chunk)
            if llama.llama_decode(context, batch) != 0:
                raise SystemExit("llama_decode failed")

    def generate(token_ids: list[list[int]], new_tokens: int) -> int:
        llama.llama_memory_clear(llama.llama_get_memory(context), True)
        # The prompts but their last tokens, then those in one call: logits are kept for the last call only.
        decode([(token, position, seq, False) for seq, ids in enumerate(token_ids)
                for position, token in enumerate(ids[:-1])])
        decode([(ids[-1], len(ids) - 1, seq, True) for seq, ids in enumerate(token_ids)])
        lengths, generated = [len(ids) for ids in token_ids], 0
        for step in range(new_tokens):
            # Sequence i's logits are the last call's i-th output.
            nexts = [int(np.ctypeslib.as_array(llama.llama_get_logits_ith(context, i), shape=(vocab_size,)).argmax())
                     for i in range(len(token_ids))]
            generated += len(nexts)
            if step < new_tokens - 1:
                decode([(token, lengths[seq], seq, True) for seq, token in enumerate(nexts)])
                lengths = [length + 1 for length in lengths]
        return generated

    generate([ids[::-1] for ids in prompts[:2]], 4)
    start = time.perf_counter()
    generated = generate(prompts, args.output_len)
    elapsed = time.perf_counter() - start
    print(json.dumps({"elapsed_s": elapsed, "output_tokens": generated}))


if __name__ == "__main__":
    main()
