"""llama.cpp (llama-cpp-python's low-level API and its multimodal library mtmd) as the GGUF scorer
needs it: a text model + projector that decodes token ids, encodes images, decodes image features
in place (bidirectionally inside a Gemma 3 image, as `mtmd_helper_decode_image_chunk` does for it)
and rolls the KV cache back (a full-size sliding-window cache, so nothing a rollback needs was evicted).
"""

from __future__ import annotations

import ctypes
import logging
import os
import weakref
from pathlib import Path

import numpy as np
from PIL import Image

from . import BackendError

KV_TYPES = ("f16", "f32")
log = logging.getLogger(__name__)

# ggml's log levels (ggml.h); llama-cpp-python 0.3.36's own callback still maps an older enum and
# prints llama.cpp's warnings as errors, so the GGUF backend installs this one: errors go to the
# log, everything else to debug.
_GGML_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.DEBUG, 4: logging.ERROR}
_log_state = {"level": logging.DEBUG, "callback": None}


def _install_log_callback() -> None:
    if _log_state["callback"] is not None:
        return
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd

    @llama_cpp.llama_log_callback
    def callback(level, text, _user_data):
        if level != 5:  # 5 continues the previous message
            _log_state["level"] = _GGML_LEVELS.get(level, logging.DEBUG)
        message = text.decode("utf-8", errors="replace").rstrip()
        if message and log.isEnabledFor(_log_state["level"]):
            log.log(_log_state["level"], "llama.cpp: %s", message)

    _log_state["callback"] = callback  # a ctypes callback must outlive every call into C
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    mtmd.mtmd_log_set(callback, ctypes.c_void_p(0))
    mtmd.mtmd_helper_log_set(callback, ctypes.c_void_p(0))


def default_threads() -> int:
    """GGUF_THREADS, else OMP_NUM_THREADS, else every CPU. On a machine shared with other busy
    processes keep it low: llama.cpp's threads spin while they wait (measured on a loaded 2-core
    box: one score took 14-22 s with 2 threads, 0.1 s with 1)."""
    for name in ("GGUF_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return os.cpu_count() or 1


def _release(resources: dict) -> None:
    """Free the llama.cpp objects (at close() or at interpreter exit, before ctypes is torn down)."""
    mtmd, lc = resources.get("mtmd"), resources.get("lc")
    for key in ("template_chunks",):
        if resources.get(key):
            mtmd.mtmd_input_chunks_free(resources.pop(key))
    if resources.get("mctx"):
        mtmd.mtmd_free(resources.pop("mctx"))
    if resources.get("batch") is not None:
        lc.llama_batch_free(resources.pop("batch"))
    if resources.get("llama") is not None:
        resources.pop("llama").close()


class GgufModel:
    """A llama.cpp text model + mtmd projector with the few low-level calls the scorer needs:
    decode token ids, encode images, decode image features, roll back the KV cache."""

    def __init__(
        self,
        model_gguf: str | Path,
        mmproj_gguf: str | Path,
        *,
        n_ctx: int = 4096,
        n_batch: int = 512,
        n_threads: int | None = None,
        kv_type: str = "f16",
        verbose: bool = False,
    ):
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd
        from llama_cpp import Llama

        if kv_type not in KV_TYPES:
            raise ValueError(f"kv_type must be one of {', '.join(KV_TYPES)}, got {kv_type!r}")
        _install_log_callback()  # llama.cpp and mtmd (which logs every image it encodes) into our log
        self.lc, self.mtmd = llama_cpp, mtmd
        kv = {"f16": llama_cpp.GGML_TYPE_F16, "f32": llama_cpp.GGML_TYPE_F32}[kv_type]
        self.n_threads = n_threads or default_threads()
        self.n_batch = n_batch
        # n_ubatch = n_batch >= the tokens of one image: a bidirectional image must sit in one ubatch.
        self.llama = Llama(
            model_path=str(model_gguf),
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_ubatch=n_batch,
            n_threads=self.n_threads,
            n_threads_batch=self.n_threads,
            logits_all=False,
            swa_full=True,
            type_k=kv,
            type_v=kv,
            flash_attn=False,
            verbose=verbose,
        )
        self._res: dict = {"lc": llama_cpp, "mtmd": mtmd, "llama": self.llama}
        self._finalizer = weakref.finalize(self, _release, self._res)
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = verbose
        params.n_threads = self.n_threads
        params.warmup = False
        self.mctx = mtmd.mtmd_init_from_file(str(mmproj_gguf).encode(), self.llama.model, params)
        if not self.mctx:
            self.close()
            raise BackendError(f"{mmproj_gguf}: llama.cpp could not load the projector (mtmd_init_from_file failed)")
        self._res["mctx"] = self.mctx
        self.non_causal_images = bool(mtmd.mtmd_decode_use_non_causal(self.mctx, None))
        self.marker = mtmd.mtmd_default_marker()
        self.n_vocab = self.llama.n_vocab()
        self.n_embd = llama_cpp.llama_model_n_embd_inp(self.llama.model)
        self.n_ctx = self.llama.n_ctx()
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._res["batch"] = self._batch
        self._template = None  # an image chunk of the right size: positions for cached features
        self.n_past = 0

    def close(self) -> None:
        self._finalizer()

    # --- memory
    def reset(self) -> None:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.llama.ctx), True)
        self.n_past = 0

    def rollback(self, n_past: int) -> None:
        if not self.lc.llama_memory_seq_rm(self.lc.llama_get_memory(self.llama.ctx), 0, n_past, -1):
            raise RuntimeError("llama_memory_seq_rm failed (this KV cache cannot roll back)")
        self.n_past = n_past

    def _room(self, n: int) -> None:
        if self.n_past + n > self.n_ctx:
            raise BackendError(
                f"{self.n_past + n} tokens exceed the GGUF context of {self.n_ctx} (raise max_seq_length)"
            )

    # --- text
    def decode_tokens(self, ids: list[int], keep: int = 1) -> np.ndarray | None:
        """Decode `ids` at the current position; the logits of the last `keep` of them (keep, vocab)
        as float32 copies, or None when keep is 0."""
        self._room(len(ids))
        rows = []
        first_kept = len(ids) - keep
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start : start + self.n_batch]
            b = self._batch
            b.n_tokens = len(chunk)
            for i, token in enumerate(chunk):
                b.token[i] = token
                b.pos[i] = self.n_past + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = start + i >= first_kept
            rc = self.lc.llama_decode(self.llama.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            for i in range(max(0, first_kept - start), len(chunk)):
                ptr = self.lc.llama_get_logits_ith(self.llama.ctx, i)
                rows.append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
            self.n_past += len(chunk)
        return np.stack(rows) if rows else None

    # --- images
    def _chunks(self, images: list[Image.Image]):
        """(chunks handle, [image chunk pointers]) for RGB images; free the handle when done."""
        mtmd = self.mtmd
        bitmaps = []
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            for im in images:
                arr = np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))
                h, w = arr.shape[:2]
                bitmap = mtmd.mtmd_bitmap_init(w, h, (ctypes.c_uint8 * arr.size).from_buffer_copy(arr.tobytes()))
                if not bitmap:
                    raise RuntimeError("mtmd_bitmap_init failed")
                bitmaps.append(bitmap)
            text = self.marker * len(images)
            inp = mtmd.mtmd_input_text()
            inp.text, inp.text_len, inp.add_special, inp.parse_special = text, len(text), False, True
            array = (mtmd.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            rc = mtmd.mtmd_tokenize(self.mctx, chunks, ctypes.byref(inp), array, len(bitmaps))
            if rc != 0:
                raise RuntimeError(f"mtmd_tokenize returned {rc}")
        except BaseException:
            mtmd.mtmd_input_chunks_free(chunks)
            raise
        finally:
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)
        out = []
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                out.append(chunk)
        return chunks, out

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        """Projected features (n_images, tokens, n_embd) float32 of images already at the projector's size."""
        handle, chunks = self._chunks(images)
        try:
            out = []
            for chunk in chunks:
                rc = self.mtmd.mtmd_encode_chunk(self.mctx, chunk)
                if rc != 0:
                    raise RuntimeError(f"mtmd_encode_chunk returned {rc}")
                n = self.mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                ptr = self.mtmd.mtmd_get_output_embd(self.mctx)
                out.append(np.ctypeslib.as_array(ptr, shape=(n * self.n_embd,)).reshape(n, self.n_embd).copy())
            return np.stack(out)
        finally:
            self.mtmd.mtmd_input_chunks_free(handle)

    def image_tokens(self, size: tuple[int, int]) -> int:
        return int(self.mtmd.mtmd_input_chunk_get_n_tokens(self._template_chunk(size)))

    def _template_chunk(self, size: tuple[int, int]):
        """An image chunk of `size` (positions and token count for pre-encoded features)."""
        if self._template is None or self._template[0] != size:
            if self._res.get("template_chunks"):
                self.mtmd.mtmd_input_chunks_free(self._res.pop("template_chunks"))
            handle, chunks = self._chunks([Image.new("RGB", size)])
            self._res["template_chunks"] = handle
            self._template = (size, chunks[0])
        return self._template[1]

    def decode_image(self, features: np.ndarray, size: tuple[int, int]) -> None:
        """Decode one image's projected features (tokens, n_embd) at the current position
        (bidirectional attention inside the image when the projector asks for it: Gemma 3 does)."""
        chunk = self._template_chunk(size)
        n = self.mtmd.mtmd_input_chunk_get_n_tokens(chunk)
        if features.shape != (n, self.n_embd):
            raise ValueError(f"image features of shape {features.shape}, expected ({n}, {self.n_embd})")
        self._room(n)
        embd = np.ascontiguousarray(features, dtype=np.float32)
        new_n_past = self.lc.llama_pos(0)
        rc = self.mtmd.mtmd_helper_decode_image_chunk(
            self.mctx,
            self.llama.ctx,
            chunk,
            embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
            self.n_past,
            0,
            self.n_batch,
            ctypes.byref(new_n_past),
            self.mtmd.mtmd_helper_post_decode_callback(),  # NULL: no callback
            None,
        )
        if rc != 0:
            raise RuntimeError(f"mtmd_helper_decode_image_chunk returned {rc}")
        self.n_past = new_n_past.value

    def eval_sequence(
        self, ids: list[int], image_token_id: int, features: np.ndarray, size: tuple[int, int], keep: int | None = 1
    ) -> np.ndarray | None:
        """Decode token ids from position 0, each run of `image_token_id` replaced by the next image's
        features. keep=None: (T, vocab) logits with NaN rows at image positions; keep=k: the logits of
        the last k tokens (which must be text after the last image)."""
        self.reset()
        runs, i = [], 0
        while i < len(ids):
            j, is_image = i, ids[i] == image_token_id
            while j < len(ids) and (ids[j] == image_token_id) == is_image:
                j += 1
            runs.append((is_image, ids[i:j]))
            i = j
        n_image_runs = sum(1 for is_image, _ in runs if is_image)
        if n_image_runs != len(features):
            raise ValueError(f"{n_image_runs} image runs in the ids, {len(features)} images")
        if keep is not None and keep > 0 and (not runs or runs[-1][0] or keep > len(runs[-1][1])):
            raise ValueError(f"the last {keep} tokens are not all text after the last image")
        rows, k = [], 0
        for r, (is_image, seg) in enumerate(runs):
            last = r == len(runs) - 1
            if is_image:
                if len(seg) != features.shape[1]:
                    raise ValueError(f"image {k}: {len(seg)} soft tokens in the ids, {features.shape[1]} features")
                self.decode_image(features[k], size)
                k += 1
                if keep is None:
                    rows.append(np.full((len(seg), self.n_vocab), np.nan, np.float32))
            else:
                out = self.decode_tokens(seg, len(seg) if keep is None else (keep if last else 0))
                if out is not None:
                    rows.append(out)
        return np.concatenate(rows) if rows else None
