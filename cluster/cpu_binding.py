"""Where a local `herd serve`'s processes run on a CPU host: `cpu_binding: auto` (the default) or `off`.

On a CPU host a model's engine process does the model's arithmetic, and the serving path (Serve's proxy, the
ingress, the model replica, Ray's own processes) wakes up in short bursts for every request and streamed
message. Left to the OS, those bursts land on the engine's core as often as on any other: at 64 streams on 2
vCPUs the engine process got 0.77-0.84 of a core while it was busy all the time, and its steps ran ~12%
slower per CPU-second than on a core of its own (`herd bench load`, docs/serving.md "Dedicated engine cores"). Raising
the serving processes' niceness or making them SCHED_BATCH moved that by a few percent only; binding the engine
to a core of its own and the serving path to the others gave the engine 0.99 of its core.

So when herd starts its own Ray (`herd serve` without --address, and `herd bench` self-hosted), `auto` binds:
- every CPU-engine model that runs one whole-model replica in an engine process (engine_process, no GPU in
  resources_per_shard, tensor x pipeline parallel 1, one replica, no engine_cpu_cores of its own) gets as many
  cores as its CPU reservation gives it threads, taken from the top of the CPUs this process may use, while
  `serving_cpus` (cpu_binding_serving_cpus, default DEFAULT_SERVING_CPUS) stay for the serving path;
- this process, and so the local Ray and everything it starts (the proxy, the ingress, the replicas), runs on
  the CPUs no engine was given, models' own engine_cpu_cores included;
- the engine process of a CPU model that was not bound (several replicas: one cpu list would be shared by all
  of them; or no core left for it) may run on every CPU but the serving path's reserve (the `serving_cpus`
  lowest of its CPUs, which stay for requests, refusals and health checks), and the plan says why.
A CPU model whose arithmetic runs in Ray's own workers (a TP x PP group's shard actors, or engine_process
off) binds nothing at all: those workers would share the serving CPUs. GPU models are not touched.

This is vLLM's CPU backend's default (VLLM_CPU_OMP_THREADS_BIND=auto, with a core reserved for its serving
process). A joined cluster (--address, KubeRay) starts its Ray processes itself: there `cpu_binding` does
nothing, and a model's engine_cpu_cores plus the pod's cpuset are the way (docs/serving.md).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

CPU_BINDING_MODES = ("auto", "off")
DEFAULT_CPU_BINDING = "auto"
# CPUs the serving path (this process, Ray, Serve's proxy, the ingress, the replicas) keeps at the least
# (`cpu_binding_serving_cpus`). Two, so that a 2-vCPU host binds nothing and binding starts at three CPUs. With
# one, a 2-vCPU host puts the engine on a core of its own and the whole serving path on the other. That raised
# 64 streams' tok/s (0.69-0.93 of in-process against 0.58-0.68 unbound on two machines), but a busy serving path
# then queues its refusals behind everything else on its core. Under overload, sustained refusals took p99
# 291, 956 and 701 ms bound, against 68 and 39 ms unbound, on a machine whose serving path needs ~2x the CPU of
# the one where one CPU was chosen (there: p99 29-93 ms bound, 30 unbound; `herd bench load --concurrency 1
# --skip-in-process --overload [--cpu-binding off]`, docs/serving.md "Dedicated engine cores"). Refusing at once
# is the promise of back-pressure, so the default keeps it on every machine; `cpu_binding_serving_cpus: 1`
# trades it for throughput where the serving path is known to fit one core.
DEFAULT_SERVING_CPUS = 2


@dataclass(frozen=True)
class CpuBinding:
    """A plan: the CPUs of the serving path, the engine cores given to models, the engine processes left to the
    OS (on every CPU herd may use but the serving path's reserve), and why a model was not bound."""

    serving: frozenset[int]
    engines: dict[str, str] = field(default_factory=dict)      # model name -> its engine_cpu_cores
    floating: dict[str, str] = field(default_factory=dict)     # model name -> every CPU herd may use
    unbound: dict[str, str] = field(default_factory=dict)      # model name -> why it was not bound
    active: bool = True        # False: nothing moves, every process stays where the OS puts it

    @property
    def engine_cpu_cores(self) -> dict[str, str]:
        """The engine_cpu_cores of each model the binding places: a bound one's cores, an unbound one's every CPU
        but the serving path's reserve (its engine process would otherwise inherit the serving CPUs)."""
        return {**self.floating, **self.engines} if self.active else {}

    def lines(self) -> list[str]:
        """What the plan does, for the start-up output."""
        if not self.active:
            # Said as a choice, not a fault: on a small host (2 vCPUs) this is the expected outcome.
            return [f"not applied (the OS places every process): model {name}: {why}"
                    for name, why in self.unbound.items()] or ["not applied: no model to bind"]
        out = [f"model {name}'s engine process on CPU {cores}" for name, cores in self.engines.items()]
        out.append(f"Ray, Serve's proxy, the ingress and the replicas on CPU {format_cpus(self.serving)}")
        for name, why in self.unbound.items():
            where = (f"; its engine process left to the OS on CPU {self.floating[name]} (off the serving path's "
                     f"reserve)") if name in self.floating else ""
            out.append(f"model {name} not bound: {why}{where}")
        return out


def engine_threads(resources_per_shard: dict[str, float]) -> int:
    """Threads an engine gets from its replica's CPU reservation (Ray sets OMP_NUM_THREADS from it)."""
    return max(1, int(resources_per_shard.get("CPU", 1)))


def _on_gpu(model) -> bool:
    return model.resources_per_shard.get("GPU", 0) > 0


def _computes_in_ray_workers(model) -> Optional[str]:
    """Why a CPU model's arithmetic runs in Ray's own worker processes (which would share the serving CPUs), or
    None when it runs in an engine process or on a GPU."""
    if _on_gpu(model):
        return None
    if model.num_shards > 1:
        return "a tensor x pipeline parallel group computes in Ray actors, which would share the serving CPUs"
    if not model.engine_process:
        return "engine_process is off: its engine computes in the replica, which would share the serving CPUs"
    return None


def _why_not_bound(model) -> Optional[str]:
    if model.max_replicas > 1:
        return f"up to {model.max_replicas} replicas (one cpu list would be shared by all of them)"
    return None


def plan(models: Iterable, allowed: Iterable[int], mode: str = DEFAULT_CPU_BINDING,
         serving_cpus: int = DEFAULT_SERVING_CPUS) -> Optional[CpuBinding]:
    """The binding of `models` (ModelDeploymentConfig, in config order) on the CPUs `allowed` this process may
    use; None with mode off. A model whose CPU arithmetic runs in Ray's workers (a TP x PP group, engine_process
    off) binds nothing at all: confining those workers to the serving CPUs would take cores from it."""
    from workers.cpu_affinity import parse_cpu_list

    if mode == "off":
        return None
    if mode not in CPU_BINDING_MODES:
        raise ValueError(f"cpu_binding must be one of {CPU_BINDING_MODES}, got {mode!r}")
    allowed = frozenset(allowed)
    models = list(models)
    blocking = {m.name: why for m in models if (why := _computes_in_ray_workers(m)) is not None}
    if blocking:
        return CpuBinding(serving=allowed, unbound=blocking, active=False)
    # Cores a model already names are its own: the serving path stays off them too.
    taken = set().union(*(parse_cpu_list(m.engine_cpu_cores) for m in models if m.engine_cpu_cores))
    free = sorted(allowed - taken, reverse=True)  # from the top: CPU 0 (interrupts, the shell) serves
    engines: dict[str, str] = {}
    unbound: dict[str, str] = {}
    for model in models:
        if model.engine_cpu_cores or _on_gpu(model):  # placed already / GPU work
            continue
        why = _why_not_bound(model)
        need = engine_threads(model.resources_per_shard)
        if why is None and len(free) - need < serving_cpus:
            why = (f"its {need} engine thread(s) need {need} core(s); {max(0, len(free) - serving_cpus)} "
                   f"free beside the serving path's {serving_cpus}")
        if why is not None:
            unbound[model.name] = why
            continue
        cores, free = free[:need], free[need:]
        engines[model.name] = format_cpus(cores)
    # Nothing to bind; or models' own lists leave the serving path fewer CPUs than it keeps (then it stays on
    # every CPU, as without binding).
    if len(free) < serving_cpus or not (engines or taken & allowed):
        return CpuBinding(serving=allowed, unbound=unbound, active=False)
    # An engine not bound is left to the OS on every CPU but the serving path's reserve (its `serving_cpus` lowest
    # CPUs), which stays for requests, refusals and health checks. Left on every CPU, a busy engine settled where
    # it first found room: on 2 vCPUs with one CPU kept for serving, a second model's engine, kept busy by an
    # overload run, was on the serving CPU in 94% of the samples where it ran (`herd bench load --concurrency 1
    # --skip-in-process --overload --cpu-binding-serving-cpus 1`, its CPU read every 50 ms).
    reserve = frozenset(sorted(free)[:serving_cpus])
    floating = {name: format_cpus(allowed - reserve) for name in unbound}
    return CpuBinding(serving=frozenset(free), engines=engines, floating=floating, unbound=unbound)


def bind_this_process(models: Iterable, mode: str, serving_cpus: int,
                      say: Callable[[str], None]) -> Optional[CpuBinding]:
    """plan() on the CPUs this process may use; `say` each of its lines (unless it is off, or does nothing a line
    is worth); when it is active, move this process, and so the Ray it is about to start, onto the serving CPUs.
    The caller then gives each model its CpuBinding.engine_cpu_cores."""
    binding = plan(models, allowed_cpus(), mode, serving_cpus)
    if binding is None or not binding.active and not binding.unbound:
        return binding
    for line in binding.lines():
        say(line)
    if binding.active:
        os.sched_setaffinity(0, binding.serving)
    return binding


def with_engine_cpu_cores(cfg, binding: Optional[CpuBinding]):
    """The ClusterConfig with each model the binding places given its engine_cpu_cores (a copy; `cfg` is kept)."""
    cores = binding.engine_cpu_cores if binding is not None else {}
    if not cores:
        return cfg
    models = [m.model_copy(update={"engine_cpu_cores": cores[m.name]}) if m.name in cores else m
              for m in cfg.models]
    return cfg.model_copy(update={"models": models})


def allowed_cpus() -> frozenset[int]:
    return frozenset(os.sched_getaffinity(0))


def format_cpus(cpus: Iterable[int]) -> str:
    """{0, 1, 2, 5} -> "0-2,5" (Linux's cpu-list syntax)."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)
