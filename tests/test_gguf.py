"""GGUF: the torch kernels match gguf's reference dequantization bit for bit, per type."""

import gguf  # a declared dependency: a broken install fails here, it is not skipped
import numpy as np
import pytest
import torch

from harness.engines.gguf_engine import BLOCK, GGUFEngine, GGUFLinear, dequantize, write_file

WRITABLE = GGUFEngine.qtypes


def k_quant_blocks(qtype: str, rows: int, seed: int) -> np.ndarray:
    """Random K-quant blocks with finite fp16 scales (gguf cannot write K-quants; files made elsewhere hold them)."""
    rng = np.random.default_rng(seed)
    n, size = BLOCK[qtype]
    raw = rng.integers(0, 256, (rows, 256 // n * size), dtype=np.uint8)
    blocks = raw.reshape(-1, size)
    scales = (rng.standard_normal((blocks.shape[0], 2)) * 0.01).astype(np.float16).view(np.uint8)
    if qtype == "Q6_K":
        blocks[:, 208:210] = scales[:, :2]
    else:
        blocks[:, 0:4] = scales
    return raw


@pytest.mark.parametrize("qtype", list(BLOCK))
@pytest.mark.parametrize("seed", [0, 1])
def test_torch_dequantize_matches_gguf_reference_exactly(qtype, seed):
    if qtype in WRITABLE:
        weights = np.random.default_rng(seed).standard_normal((16, 512)).astype(np.float32)
        packed = gguf.quants.quantize(weights, gguf.GGMLQuantizationType[qtype])
    else:
        packed = k_quant_blocks(qtype, 16, seed)
    reference = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType[qtype]).astype(np.float32)
    ours = dequantize(torch.from_numpy(packed), qtype, reference.shape).numpy()
    assert np.array_equal(ours, reference)


def test_k_quant_file_made_elsewhere_is_read_and_run(tmp_path):
    from torch import nn

    packed = k_quant_blocks("Q4_K", 32, 3)
    path = tmp_path / "kquant.gguf"
    writer = gguf.GGUFWriter(str(path), "quantmatrix")
    writer.add_tensor("0.weight", packed, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    writer.add_tensor("0.bias", np.zeros(32, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert GGUFEngine().recognise(path) == "Q4_K"
    model = GGUFEngine().load(path, nn.Sequential(nn.Linear(256, 32, device="meta")), dtype=torch.float32,
                              device=torch.device("cpu"))
    assert isinstance(model[0], GGUFLinear)
    x = torch.randn(2, 256)
    expected = x @ torch.from_numpy(gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q4_K)).T
    assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-5)


def test_all_in_one_gguf_file_is_refused_with_the_documented_error(tmp_path):
    """The seed: only the UNet/transformer can be loaded from GGUF, not an all-in-one single file."""
    from harness.engines.gguf_engine import GGUFContentsError
    from harness.stacks.direct import load_prequantized, prequantized_file

    engine = GGUFEngine()
    path = prequantized_file(tmp_path, engine, "Q8_0", "pipe-xs", torch.float32, 0)
    with pytest.raises(GGUFContentsError, match=r"all-in-one GGUF file.*text_encoder: \d+ tensors, vae: \d+") as exc:
        load_prequantized(engine, "Q8_0", "pipe-xs", path, torch.float32, torch.device("cpu"))
    assert str(path) in str(exc.value)


def test_gguf_file_that_does_not_fit_the_model_is_refused(tmp_path):
    """Loading is strict: a stray tensor or a missing one is an error naming the file, never silently dropped."""
    from harness.engines.gguf_engine import GGUFContentsError
    from harness.models.imitation import build_model, build_skeleton

    engine = GGUFEngine()
    model = engine.quantize(build_model("dit-xs"), "Q8_0", dtype=torch.float32, device=torch.device("cpu"))
    good = engine.save(model, "Q8_0", tmp_path / "good.gguf")
    engine.load(good, build_skeleton("dit-xs"), dtype=torch.float32, device=torch.device("cpu"))

    stray = engine.quantize(build_model("dit-xs"), "Q8_0", dtype=torch.float32, device=torch.device("cpu"))
    stray.lora = torch.nn.Linear(4, 4)  # a tensor the model does not have
    engine.save(stray, "Q8_0", tmp_path / "stray.gguf")
    short = engine.quantize(build_model("dit-xs"), "Q8_0", dtype=torch.float32, device=torch.device("cpu"))
    short.proj_out.bias = None  # a tensor the model needs
    engine.save(short, "Q8_0", tmp_path / "short.gguf")
    for name in ("stray.gguf", "short.gguf"):
        with pytest.raises(GGUFContentsError, match="does not fit the model") as exc:
            engine.load(tmp_path / name, build_skeleton("dit-xs"), dtype=torch.float32, device=torch.device("cpu"))
        assert name in str(exc.value)


def test_a_gguf_text_encoder_loads_dequantized_as_sdnext_loads_it(tmp_path):
    """SD.Next reads a GGUF T5 with transformers (vladmandic/sdnext@d11a619 modules/model_te.py:28-33:
    T5EncoderModel.from_pretrained(None, gguf_file=..., config=...)), which dequantizes every tensor while loading:
    a GGUF text encoder saves disk, not memory. A tiny T5 written as Q8_0 (its Linear weights; llama.cpp's tensor
    names from gguf's own map), loaded so: 8.5 bits per Linear weight on disk, float32 parameters in memory, the
    output close to the float encoder's."""
    import transformers

    from harness.models.real import seed_weights
    from harness.models.specs import _t5

    config = transformers.T5Config(**_t5(128)[1])
    model = seed_weights(transformers.T5EncoderModel(config), 0).eval()
    arch, kind = gguf.MODEL_ARCH.T5ENCODER, gguf.GGMLQuantizationType.Q8_0
    names = gguf.get_tensor_name_map(arch, config.num_layers)
    quantized = 0

    def tensors():
        nonlocal quantized
        for key, value in model.state_dict().items():
            name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if name is None:  # the encoder's copy of the shared embedding
                assert key == "encoder.embed_tokens.weight"
                continue
            array = value.float().numpy()
            if value.dim() == 2 and not name.startswith(("token_embd", "enc.blk.0.attn_rel_b")):
                quantized += value.numel()
                yield name, gguf.quants.quantize(array, kind), kind
            else:
                yield name, array, None

    write_file(tmp_path / "t5.gguf", gguf.MODEL_ARCH_NAMES[arch], tensors())
    reader = gguf.GGUFReader(str(tmp_path / "t5.gguf"))
    q8 = [t for t in reader.tensors if t.tensor_type == gguf.GGMLQuantizationType.Q8_0]
    assert 8 * sum(int(t.n_bytes) for t in q8) / quantized == 8.5 and quantized > 0.5 * model.num_parameters()
    loaded = transformers.T5EncoderModel.from_pretrained(str(tmp_path), gguf_file="t5.gguf", config=config,
                                                        torch_dtype=torch.float32)  # SD.Next's dtype on a CPU
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}  # dequantized: float in memory
    ids = torch.tensor([[4, 5, 6, 7, 1]])
    with torch.no_grad():
        want, got = model(ids).last_hidden_state, loaded(ids).last_hidden_state
    assert 10 * torch.log10(want.pow(2).mean() / (want - got).pow(2).mean()) > 20  # Q8_0's error only: 27 dB
