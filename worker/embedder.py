"""Batched audio embedding: log-mel on the model's device, then CLAP's audio tower."""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable

import numpy as np
import torch

from clapq.clap import LoadedClap
from worker.features import LogMel

THREADS = torch.get_num_threads()  # torch's threads when the worker imports this (after the fork): the cores


DEFAULT_BATCH = 16  # windows a pass where CLAPQ_BATCH_SIZE is auto and ROWS_PER_LANE does not apply
# windows a one-thread pass of the eager tower takes where CLAPQ_BATCH_SIZE and CLAPQ_LANES are auto. On one thread,
# the full-size tower costs a window 1.59x (bf16) / 1.14x (fp32) as much in passes of 1 window as in passes of
# 16, 1.25x / 1.03x in passes of 2, 1.04x / 1.01x in passes of 8 (benchmarks/pass_rows.py, BENCHMARKS.md): a batch of
# 16 cut into one pass per core left passes of 2 windows on 8 cores and of 1 on 16
ROWS_PER_LANE = 8
# the most windows an auto batch takes where 8 a core would be more: each costs the worker ~17 MB with the full-size
# model (peak RSS 1.3 GB at 16, 2.3 GB at 64, 3.6 GB at 128: helper-86, bf16); past 32 cores each core's pass
# takes fewer than 8 windows
MAX_AUTO_BATCH = 256


def batch_for(configured: int | None, device: torch.device, compiled: bool, lanes: int | None, threads: int) -> int:
    """The windows of a model batch (CLAPQ_BATCH_SIZE; None is auto). auto: on a CPU with an eager tower and
    CLAPQ_LANES=auto, ROWS_PER_LANE for each torch thread (one one-thread pass per core, lanes_for), so every
    pass takes 8 windows up to 32 cores (16 on 2 cores, as before); past that, as many a core as MAX_AUTO_BATCH
    leaves (a multiple of the cores, so none is idle); DEFAULT_BATCH on a GPU, for a compiled tower, and where
    CLAPQ_LANES is set."""
    if configured is not None:
        return configured
    if device.type != "cpu" or compiled or lanes is not None:
        return DEFAULT_BATCH
    threads = max(1, threads)
    return threads * max(1, min(ROWS_PER_LANE, MAX_AUTO_BATCH // threads))


def lanes_for(configured: int | None, device: torch.device, compiled: bool, batch: int, threads: int) -> int:
    """How many model passes run side by side (CLAPQ_LANES; None is auto). auto: on a CPU with an eager
    tower, one per torch thread (each pass then runs on one thread), as many as divide the batch's rows
    (no pass is padded); 1 on a GPU, and for a compiled tower (no gain measured, and its first pass
    compiles). One pass per core is ~20% faster than one pass over every core on our 2-core CPU (the
    only size measured), and loses less to the decoders and the API beside it (BENCHMARKS.md): a
    pass's threads wait for each other at every operation, so one thread held up by another process
    holds up all of them."""
    if configured is not None:
        return max(1, min(configured, batch))
    if device.type != "cpu" or compiled:
        return 1
    return max(n for n in range(1, min(threads, batch) + 1) if batch % n == 0)  # no padded rows


def _as_tensor(waves: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(waves, dtype=np.float32))


class AudioEmbedder:
    """Turns a batch of fixed-length 48 kHz windows into L2-normalised vectors.

    With `lanes` > 1 (a CPU) a batch is cut into that many equal parts, each run by its own thread with
    torch's threads shared out between them: the weights are shared, and a part's shapes never depend
    on what else was in the batch, so a window's vector stays bit for bit the same."""

    def __init__(self, clap: LoadedClap, compile_model: bool = False, lanes: int = 1) -> None:
        self.clap = clap
        self.window_samples = int(clap.feature_extractor.nb_max_samples)
        self.rate = int(clap.feature_extractor.sampling_rate)
        self.logmel = LogMel(clap.feature_extractor, clap.fusion).to(clap.device)
        # torch.compile of the audio tower: on our 2-core CPU +15% in fp32, +5% in bf16, vectors the same to
        # cosine 1.00000 (BENCHMARKS.md); when, is clapq.precision.compile_applies's rule
        self.audio_model = torch.compile(clap.model.audio_model) if compile_model else clap.model.audio_model
        self.lanes = max(1, lanes)
        self.threads_per_lane = max(1, THREADS // self.lanes) if self.lanes > 1 else torch.get_num_threads()
        self._lanes = None
        if self.lanes > 1:  # each lane's thread takes its share of the cores (threads started later do too)
            self._lanes = cf.ThreadPoolExecutor(self.lanes, thread_name_prefix="model-lane", initializer=torch.set_num_threads,
                                                initargs=(self.threads_per_lane,))

    def close(self) -> None:
        """Let the lanes' threads end (an embedder replaced, as after a failed compile)."""
        if self._lanes is not None:
            self._lanes.shutdown(wait=False)

    def features(self, waves: np.ndarray) -> torch.Tensor:
        return self._mel(_as_tensor(waves))

    @torch.inference_mode()
    def _mel(self, x: torch.Tensor) -> torch.Tensor:
        if self.clap.device.type == "cuda":
            x = x.pin_memory().to(self.clap.device, non_blocking=True)
        return self.logmel(x)

    @torch.inference_mode()
    def _tower(self, mel: torch.Tensor) -> np.ndarray:
        is_longer = torch.zeros((mel.shape[0], 1), dtype=torch.bool, device=mel.device)
        # ClapModel.get_audio_features: audio tower -> projection -> L2 normalisation
        hidden = self.audio_model(input_features=mel.to(self.clap.dtype), is_longer=is_longer).pooler_output
        out = torch.nn.functional.normalize(self.clap.model.audio_projection(hidden).float(), dim=-1)
        return out.cpu().numpy().astype(np.float32)

    def _windows(self, waves: torch.Tensor) -> np.ndarray:
        return self._tower(self._mel(waves))

    def _in_lanes(self, run: Callable[[torch.Tensor], np.ndarray], rows: torch.Tensor,
                  wanted: int | None = None) -> np.ndarray:
        """`run` over the batch `rows`, in equal parts side by side (zero rows pad the last part). Where only the
        first `wanted` rows are wanted (the rest pad a batch), a part that holds none of them is not run, and the
        answer has the rows of the parts run: each part run keeps its shape, so its vectors keep their bits."""
        if self._lanes is None:
            return run(rows)
        n = len(rows)
        per = -(-n // self.lanes)
        if per * self.lanes != n:
            rows = torch.cat([rows, rows.new_zeros((per * self.lanes - n, *rows.shape[1:]))])
        needed = self.lanes if wanted is None else max(1, min(self.lanes, -(-wanted // per)))
        parts = [rows[i * per:(i + 1) * per] for i in range(needed)]
        return np.concatenate(list(self._lanes.map(run, parts)))[:n]

    def embed_features(self, mel: torch.Tensor) -> np.ndarray:
        """(B, C, frames, n_mels) log-mel -> (B, dim) float32, unit length."""
        return self._in_lanes(self._tower, mel)

    def embed(self, waves: np.ndarray, wanted: int | None = None) -> np.ndarray:
        """(B, window_samples) float32 -> (B, dim) float32, unit length; with `wanted`, only the first `wanted` rows
        are sure to be given (the rest of the batch is padding: lanes that hold only padding are not run)."""
        if waves.ndim != 2 or waves.shape[1] != self.window_samples:
            raise ValueError(f"expected (B, {self.window_samples}) windows, got {waves.shape}")
        return self._in_lanes(self._windows, _as_tensor(waves), wanted)
