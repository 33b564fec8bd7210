"""bench.large_model's arithmetic: KV bytes, budgets, parameter count, config.pbtxt parsing."""
from bench.large_model import (GiB, LLAMA_3_2_1B, kv_bytes_per_token, parameter_count, pbtxt_parameters,
                               sequences_in_budget, slot_buffer_bytes)
from llm_backend.model_config import EngineParams, render_config_pbtxt
from llm_backend.service import kv_slots


def test_kv_bytes_of_the_llama_3_2_1b_shape():
    # 2 (K, V) x 16 layers x 8 KV heads x 64 x 4 bytes (fp32 KV on the CPU): 64 KiB a token
    assert kv_bytes_per_token(16, 8, 64, 4) == 65536
    assert kv_bytes_per_token(16, 8, 64, 2) == 32768
    assert slot_buffer_bytes(16, 2048, 65536) == 2 * GiB


def test_sequences_in_budget_agree_with_the_engine():
    per_token = kv_bytes_per_token(16, 8, 64, 4)
    assert sequences_in_budget(2 * GiB, 2048, per_token) == 16
    assert sequences_in_budget(8 * GiB, 8192, per_token) == 16
    assert sequences_in_budget(8 * GiB, 131072, per_token) == 1
    assert sequences_in_budget(4 * GiB, 131072, per_token) == 0
    for length in (512, 2048, 3000, 8192):
        for gib in (2, 4, 8):
            params = EngineParams(max_num_seqs=10**9, max_model_len=length, kv_cache_mb=gib * 1024)
            assert kv_slots(params, length * per_token) == sequences_in_budget(gib * GiB, length, per_token)


def test_parameter_count_is_llama_3_2_1b():
    assert parameter_count(LLAMA_3_2_1B) == 1_235_814_400     # Llama-3.2-1B's published 1.24 B


def test_pbtxt_parameters_round_trip():
    params = EngineParams(max_num_seqs=16, max_model_len=2048, chat_template='{{ "a\\b" }}\n\t"x"')
    parsed = pbtxt_parameters(render_config_pbtxt("m", params))
    assert EngineParams.from_parameters(parsed) == params
