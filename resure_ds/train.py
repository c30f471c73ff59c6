"""The recipe: setup -> train -> save_checkpoint -> cleanup.

    bash launch/train.sh [RECIPE] [key=value ...]          # starts this node's ranks (resure_ds/node.py)
    deepspeed --num_gpus 2 --module resure_ds.train RECIPE key=value ...

The layers below do the work (docs/architecture.md): data/ wires the prepared corpus and this
rank's batches, step.py runs one optimizer step, stats/ holds the method's statistics and
weights, runtime/ the engine, collectives, checkpoints and stop policy, report/ the audit and
the end-of-run report.
"""
from __future__ import annotations

import argparse
import os
import time
import traceback

from .runtime.stop import record_early

if __name__ == "__main__":  # first: a stop while the imports below run (seconds) is recorded, not fatal
    record_early()

from .config import Config, load_config, parse_duration, split_recipe_args, to_dict
from .data.pipeline import TrainingData
from .data.order import Cursor
from .errors import ConfigError, DataError, TrainingError, say_error
from .eval.validation import Validation
from .files import write_json
from .models import load_tokenizer, resolve_model_path, shape_config
from .report import audit
from .report.build import write_report
from .report.run_files import write_sources
from . import dist
from .runtime import checkpoint, run_folder
from .runtime.engine import Engine, init_distributed, to_universal
from .runtime.memory import resolve_auto_stage
from .runtime.metrics import MetricsLogger
from .runtime.process import leave, leave_now
from .runtime.profile import StepProfiler
from .runtime.run_folder import RunFolderBusy
from .runtime.sequence import SequenceParallel
from .runtime.stop import EXIT_RESUME, SIGNALS, Divergence, StopPolicy, StoppedAtStart
from .runtime.trackers import check_installed, open_trackers
from .stats.method import Method
from .step import Stepper

print0 = dist.print0


class Recipe:
    """One run (or, after a stop, one leg of it) in this process."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.step, self.cursor, self.best_val = 0, Cursor(), None
        self.logger: MetricsLogger | None = None
        self.startup: dict = {}  # seconds spent in each phase before the first step

    finished = property(lambda self: self.step >= self.cfg.train.max_steps)  # all steps trained, not a stopped leg

    # -- setup -------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, t0 = self.cfg, time.perf_counter()
        self.stop = StopPolicy(cfg.train.stop_after, parse_duration(cfg.train.time_limit))
        self.stop.install()  # a SIGTERM/SIGUSR1 from here on stops at a step boundary with a checkpoint
        self.divergence = Divergence(cfg.train.max_bad_steps, cfg.train.lr)
        self.rank, self.world = init_distributed(cfg.dist.timeout)
        self.stop.end_if_asked_at_start(dist.all_reduce_dict)  # every rank together, before anything is written
        self.sp = SequenceParallel(cfg.train.sequence_parallel, self.rank, self.world)  # 1: every rank its rows
        self.run_dir = os.path.join(cfg.output.dir, cfg.output.name)
        self.ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        self.lock = run_folder.claim(cfg, self.run_dir, self.rank)  # checked, and one run at a time
        check_installed(cfg.output.report_to)
        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            write_json(os.path.join(self.run_dir, "config.json"), to_dict(cfg), indent=2)
        checkpoint.seed_all(cfg.train.seed + self.rank)
        model_path = resolve_model_path(cfg.model.path)  # file-locked: one rank converts, others wait
        self.shape_config = shape_config(model_path)
        self.tokenizer = load_tokenizer(model_path, cfg.model.chat_template, cfg.model.trust_remote_code)
        t1 = time.perf_counter()
        self.data = TrainingData(cfg, self.tokenizer, model_path, self.rank)
        if self.rank == 0:
            write_sources(self.run_dir, self.data.source_files())
        rows = self.data.validation_rows
        self.validation = Validation(rows, self.tokenizer.pad_token_id, cfg.eval.micro_batch_size,
                                     self.sp) if rows else None
        t2 = time.perf_counter()
        if cfg.train.zero_stage == "auto":  # resolved once: runtime/memory.py
            cfg = self.cfg = resolve_auto_stage(cfg, model_path, self.world, checkpoint.find(self.ckpt_dir,
                                                                                              cfg.checkpoint.resume))
        self.found = self.resume_point()
        if self.found is not None:
            self.cursor = Cursor(**self.found.progress.cursor)
        # The loader's workers start now, so their start-up overlaps the engine's.
        self.batches = self.data.batches(self.sp.dp_rank, self.sp.dp_world, self.cursor, ignore_signals=SIGNALS)
        self.engine = Engine(cfg, model_path, universal=self.found is not None and self.found.universal,
                             vocab=len(self.tokenizer))
        self.sp.install(self.engine.module.config, self.engine.attention)  # after the whole-row checks
        print0(self.engine.describe(self.world) + (f", validation on {self.validation.dialogues:,} dialogues"
                                                    if self.validation else ""))
        self.method = Method(cfg, [p.spec.weight for p in self.data.prepared])
        if cfg.data.mixture == "adaptive" and self.method.mixture is None:
            print0("data.mixture=adaptive with one source: its share is all of it, so the mixture stays fixed")
        self.audit = audit.AuditLog(self.run_dir, self.rank)
        self.stepper = Stepper(cfg, self.engine, self.method, self.audit, self.data.source_names, self.rank, self.sp)
        self.startup = {"group_model_tokenizer": t1 - t0, "data": t2 - t1, "engine": time.perf_counter() - t2}

    def resume_point(self) -> checkpoint.Found | None:
        """The checkpoint to resume from, checked against this run's data; on another world size, its
        DeepSpeed part converted to the universal form (rank 0; the others meet it in the engine's
        first collectives, before any of them loads)."""
        found = checkpoint.find(self.ckpt_dir, self.cfg.checkpoint.resume)
        if found is None:
            return None
        fresh = "or start afresh with checkpoint.resume=none (or another output.name)"
        if found.progress.data != self.data.identity():
            raise DataError(f"{found.path} trained on other data: {self.data.describe_change(found.progress.data)}; "
                            f"its data position would mean nothing here. Resume with that data, {fresh}")
        diff = checkpoint.differences(found.progress.trained_on, checkpoint.trained_on(self.cfg, self.shape_config))
        if diff:
            raise ConfigError(f"{found.path} was trained with another setting ({'; '.join(diff)}): resuming "
                              f"would repeat and skip data or load tensors of another shape. Resume with the "
                              f"checkpoint's settings, {fresh}")
        if found.progress.world_size != self.world and self.cfg.train.zero_stage > 0:  # partitions follow it
            if self.rank == 0:
                to_universal(found.path, found.path + ".universal")
            found.universal = True
        return found

    def resume(self) -> None:
        """Restore the checkpoint found in setup; without one, a fresh start (which drops an earlier
        run's audit rows from a reused run folder)."""
        found = self.found
        if found is None:
            self._truncate_audit(0)
            return
        p, t0 = found.progress, time.perf_counter()
        if self.engine.load(found.ckpt_dir, found.ds_tag) is None:
            raise FileNotFoundError(f"checkpoint {found.path}: DeepSpeed found no checkpoint files there")
        self.step, self.best_val = p.step, p.best_val  # the cursor was read in setup
        self.method.load_state_dict(p.method)
        rng = checkpoint.load_rank_rng(found, self.rank, self.world)
        if rng is not None:
            checkpoint.set_rng_state(rng)
        else:  # another world size: fresh per-rank streams, still a function of seed, rank and step
            checkpoint.seed_all(self.cfg.train.seed + 1000003 * self.step + self.rank)
        self._truncate_audit(self.step)
        self.startup["resume"] = time.perf_counter() - t0
        print0(f"resumed from {found.path} at step {self.step} (rows seen {self.cursor.rows_seen}, epoch "
               f"{self.cursor.epoch}; saved on {p.world_size} rank(s), now {self.world})")

    def _truncate_audit(self, step: int) -> None:
        """The audit rows of steps after `step` belong to training that is being redone (rank 0 edits,
        the others wait: nobody writes before the barrier)."""
        if self.rank == 0:
            dropped = audit.truncate(self.run_dir, step)
            if dropped:
                print0(f"audit: dropped {dropped:,} rows of steps after {step} (training redone from there)")
        dist.barrier()

    # -- train ---------------------------------------------------------------------------
    def train(self) -> str | None:
        """Steps until max_steps, or until a stop (returns its reason: the run is resumable)."""
        cfg = self.cfg
        if self.rank == 0:
            trackers = open_trackers(cfg.output.report_to, self.run_dir, self.step, to_dict(cfg),
                                     cfg.output.project, cfg.output.name)
            self.logger = MetricsLogger(self.run_dir, cfg.train.max_steps, self.step, cfg.train.log_every, trackers)
        self.engine.train()
        print0("startup (s): " + ", ".join(f"{k} {v:.1f}" for k, v in self.startup.items()))
        every, start = cfg.checkpoint.every, self.step
        end = self.stop.end_step(start, cfg.train.max_steps)
        profiler = StepProfiler(cfg.train.profile_steps, self.run_dir, self.rank)
        reason = None
        while self.step < end and reason is None:
            profiler.before(self.step + 1)
            row, self.cursor = self.stepper.run(self.batches, self.step + 1, self.stop)
            self.step += 1
            profiler.after(self.step)
            self.stop.slowest_step = max(self.stop.slowest_step, row["step_time_s"])
            if self.validation is not None and (self.step == cfg.train.max_steps
                                                or (cfg.eval.every and self.step % cfg.eval.every == 0)):
                row.update(self.validate())
            signalled, out_of_time = row.pop("stop_signal"), row.pop("stop_time")
            if self.logger is not None:
                self.logger.log(row)
            self.divergence.check(self.step, row)
            if self.step < cfg.train.max_steps:
                reason = ("a signal (SIGTERM/SIGUSR1)" if signalled else "train.time_limit" if out_of_time
                          else "train.stop_after" if self.step >= end else None)
            if every and self.step % every == 0 and self.step < end and reason is None and self.divergence.healthy:
                self.save_checkpoint()
        profiler.finish(self.step)  # a run that ended inside the profiled steps
        if self.step > start and self.divergence.healthy:
            self.save_checkpoint()
        return reason

    def validate(self) -> dict:
        """Validation metrics for this step (every rank); a new best is exported when eval.keep_best."""
        t0 = time.perf_counter()
        res = self.validation.run(self.engine)
        res["val_time_s"] = time.perf_counter() - t0
        if self.cfg.eval.keep_best and (self.best_val is None or res["val_loss"] < self.best_val):
            self.best_val = res["val_loss"]  # identical on every rank (all-reduced), so all export together
            self.engine.export_hf(os.path.join(self.run_dir, "best"), self.tokenizer)
            if self.rank == 0:
                write_json(os.path.join(self.run_dir, "best", "resure_best.json"),
                           {"step": self.step, "val_loss": res["val_loss"]})
        return res

    # -- save ------------------------------------------------------------------------------
    def progress(self) -> checkpoint.Progress:
        t = self.cfg.train
        return checkpoint.Progress(self.step, self.cursor.to_dict(), self.world,
                                   self.sp.dp_world * t.micro_batch_size * t.grad_accum, self.data.identity(),
                                   self.method.state_dict(), self.best_val,
                                   checkpoint.trained_on(self.cfg, self.shape_config))

    def save_checkpoint(self) -> None:
        t0 = time.perf_counter()
        self.audit.flush()
        if self.cfg.checkpoint.keep_last == 0:
            return  # throwaway run (e.g. the noisy-mix study): metrics and audit only
        checkpoint.save(self.engine, self.ckpt_dir, self.progress(), self.rank, self.world,
                        self.cfg.checkpoint.keep_last)
        self.stop.slowest_save = max(self.stop.slowest_save, time.perf_counter() - t0)

    def finish(self) -> None:
        """Export and the end-of-run summary and plot (rank 0)."""
        if self.cfg.checkpoint.export:
            self.engine.export_hf(os.path.join(self.run_dir, "export"), self.tokenizer)
        if self.rank == 0:
            out = self.cfg.output
            print(write_report(self.run_dir, data=self.data.counts(), with_plot=out.plot, html=out.report,
                               top=out.report_top), flush=True)

    # -- cleanup ---------------------------------------------------------------------------
    def close(self) -> None:
        self.batches = None  # stops the loader's worker processes
        if self.logger is not None:
            self.logger.close()
        if getattr(self, "lock", None) is not None:
            self.lock.release()


def run_recipe(cfg: Config) -> Recipe:
    """One whole run (or, after a stop, one leg of it) in this process; the process group stays up."""
    recipe = Recipe(cfg)
    try:
        recipe.setup()
        recipe.resume()
        reason = recipe.train()
        if recipe.finished:
            recipe.finish()
        else:
            print0(f"stopped at step {recipe.step} of {cfg.train.max_steps} ({reason}); checkpoint saved, exit "
                   f"status {EXIT_RESUME}: run the same command to continue")
    finally:
        recipe.close()
    return recipe


def cleanup() -> None:
    dist.destroy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("args", nargs="*", help="[RECIPE.yaml] then dotted key=value overrides, e.g. train.max_steps=10")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    recipe, overrides = split_recipe_args(ap.parse_args(argv).args)
    cfg, on_rank = None, f" on rank {dist.rank()}" if dist.world() > 1 else ""
    try:
        cfg = load_config(recipe, overrides)
        run = run_recipe(cfg)
    except StoppedAtStart as e:
        print0(str(e))
        cleanup()
        return EXIT_RESUME
    except RunFolderBusy as e:  # one line, from rank 0, which knows the holder
        return leave_now(say_error(str(e)) if dist.rank() == 0 else 2)
    except (FileNotFoundError, ConfigError, DataError, TrainingError) as e:
        return leave_now(say_error(str(e), on_rank))
    except OSError as e:  # a full disk or a read-only output.dir: the system's words, not a traceback
        where = f" ({os.path.join(cfg.output.dir, cfg.output.name)})" if cfg is not None else ""
        return leave_now(say_error(f"{e}; the run writes under output.dir{where}: it must be writable and have space "
                                   "(a checkpoint being saved stays a .saving folder; the last published one is "
                                   "intact)", on_rank))
    except BaseException:
        traceback.print_exc()
        say_error("the run failed (traceback above); the other ranks stop too", on_rank)
        return leave_now(1)
    cleanup()
    return 0 if run.finished else EXIT_RESUME


if __name__ == "__main__":
    leave(main())
