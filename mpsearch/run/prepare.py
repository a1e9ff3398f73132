"""What a session is opened on: the model (loaded, or given as an object) and its data in windows.

A causal LM reads text: calibration, evaluation, the Gram windows and the refinement slice
after them, and the task items from the evaluation text. A model with its own data
(:class:`mpsearch.models.protocol.ModelData`) gives batches for the same roles.
"""

from __future__ import annotations

from ..core.profiling import Stages
from ..models import load_model, load_text, token_chunks
from ..models.data import conventions, text_tokens
from ..models.loader import WITH_DATA, LoadedModel
from ..models.protocol import check_data


def model_and_text(cfg, lm: LoadedModel | None, stages: Stages) -> tuple[LoadedModel, tuple | None]:
    """The texts (read first: a bad text spec fails before the model loads), then the model, or
    ``lm`` as given; a model's own data is checked against its protocol before anything heavy."""
    texts = None
    brings_data = lm.data is not None if lm is not None else cfg.model in WITH_DATA
    if not brings_data:
        with stages("load text"):
            texts = load_text(cfg.calibration), load_text(cfg.evaluation) if cfg.measure else None
    if lm is None:
        with stages("load model"):
            lm = load_model(cfg.model)
    if lm.data is not None:
        with stages("check data"):
            check_data(lm.data, lm.model)
    return lm, texts


def task_evaluator(cfg, lm, texts, stages: Stages):
    """The task items, built before the heavy stages (a text too short for them fails here)."""
    if not getattr(cfg, "tasks", False) or not cfg.measure or lm.data is not None or texts is None:
        return None
    from ..measure.tasks import TaskEvaluator, TaskSettings

    lead = conventions(lm.tokenizer, cfg.bos)
    settings = TaskSettings(
        cloze_items=cfg.task_items, mc_items=max(1, cfg.task_items // 2), context_tokens=cfg.task_context, seed=cfg.seed
    )
    with stages("build task items"):
        try:
            return TaskEvaluator(
                texts[1],
                lm.tokenizer,
                settings,
                bos=lead["leading_tokens"] if lead["evaluation_leading"] else [],
                progress=cfg.progress,
            )
        except ValueError as e:
            raise ValueError(f"task accuracy on {cfg.evaluation}: {e} (or --no-tasks)") from None


def text_data(cfg, lm, texts, gram: bool, stages: Stages):
    """A causal LM's windows: calibration, evaluation, the Gram windows (``gram_chunks``, the
    calibration windows first) and the refinement slice after them."""
    calib_text, eval_text = texts
    with stages("tokenize"):
        lead = conventions(lm.tokenizer, cfg.bos)
        cl, el = lead["calibration_leading"], lead["evaluation_leading"]
        calib = token_chunks(lm.tokenizer, calib_text, cfg.calib_seq_len, cfg.calib_chunks, lead=cl)
        evalt = (
            token_chunks(lm.tokenizer, eval_text, cfg.eval_seq_len, cfg.eval_chunks, lead=el) if cfg.measure else None
        )
    with stages("tokenize the Gram windows and the refinement slice"):
        # the Gram matrix gets more windows than the rest (SearchConfig.gram_chunks)
        gram_tokens = calib
        if gram and cfg.gram_chunks > cfg.calib_chunks:
            gram_tokens = token_chunks(lm.tokenizer, calib_text, cfg.calib_seq_len, cfg.gram_chunks, lead=cl)
        sliced = None
        if cfg.measure and cfg.refine > 0:
            sliced = token_chunks(
                lm.tokenizer,
                calib_text,
                cfg.refine_seq_len,
                cfg.refine_chunks,
                skip=text_tokens(gram_tokens, lm.tokenizer, cl),
                lead=cl,
            )
    return calib, evalt, gram_tokens, sliced


def own_data(cfg, lm, texts, gram: bool, stages: Stages):  # texts: None (this model reads no text)
    """A model with its own data (a classifier): calibration batches, the Gram batches (the
    calibration ones first), the refinement slice after them, and the evaluation batches."""
    with stages("prepare data"):  # SearchConfig refused text flags for such a model already
        calib = lm.data.calibration(cfg.calib_chunks)
        gram_batches = max(cfg.gram_chunks, cfg.calib_chunks) if gram else cfg.calib_chunks
        gram_tokens = lm.data.calibration(gram_batches) if gram_batches > cfg.calib_chunks else calib
        sliced = lm.data.calibration(cfg.refine_chunks, skip=gram_batches) if cfg.measure and cfg.refine > 0 else None
        evalt = lm.data.evaluation(cfg.eval_chunks) if cfg.measure else None
    return calib, evalt, gram_tokens, sliced
