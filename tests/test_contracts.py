"""The tensor contracts and ensemble wiring are self-consistent for every profile."""

import pytest

from wff.config import PROFILES
from wff.contracts import contracts_for


def full_dims(contract, spec):
    """Dims as seen by the ensemble: a batching step's tensors gain a leading batch dim."""
    return ((-1,) if contract.max_batch_size > 0 else ()) + spec.dims


def compatible(a, b):
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", sorted(PROFILES))
class TestWiring:
    def test_every_step_input_fed_once(self, name):
        """Each step input is mapped, and every mapped tensor is produced earlier or is an ensemble input."""
        c = contracts_for(PROFILES[name])
        available = {s.name: (c.ensemble, s) for s in c.ensemble.inputs}
        for step, in_map, out_map in c.wiring:
            contract = c.step(step)
            assert sorted(in_map) == sorted(s.name for s in contract.inputs), step
            for step_input, tensor in in_map.items():
                assert tensor in available, f"{step}.{step_input} <- {tensor} is not produced before {step}"
            for step_output, tensor in out_map.items():
                assert tensor not in available, f"{tensor} produced twice"
                available[tensor] = (contract, contract.output(step_output))

    def test_connected_tensors_agree(self, name):
        """Producer and consumer of each ensemble tensor agree on dtype and dims."""
        c = contracts_for(PROFILES[name])
        produced = {s.name: (c.ensemble, s) for s in c.ensemble.inputs}
        for step, in_map, out_map in c.wiring:
            contract = c.step(step)
            for step_input, tensor in in_map.items():
                src_contract, src = produced[tensor]
                dst = contract.input(step_input)
                assert src.data_type == dst.data_type, f"{tensor}: {src.data_type} -> {dst.data_type}"
                assert compatible(full_dims(src_contract, src), full_dims(contract, dst)), f"{tensor} dims"
            for step_output, tensor in out_map.items():
                produced[tensor] = (contract, contract.output(step_output))

    def test_ensemble_outputs_produced_with_matching_specs(self, name):
        """Every ensemble output is some step's output with the same dtype and dims."""
        c = contracts_for(PROFILES[name])
        produced = {}
        for step, _, out_map in c.wiring:
            for step_output, tensor in out_map.items():
                produced[tensor] = (c.step(step), c.step(step).output(step_output))
        for spec in c.ensemble.outputs:
            contract, src = produced[spec.name]
            assert src.data_type == spec.data_type
            assert compatible(full_dims(contract, src), spec.dims), spec.name

    def test_names_scoped_to_their_step(self, name):
        """Step tensors are named after their step (no exporter defaults such as input.1)."""
        c = contracts_for(PROFILES[name])
        for contract in c.steps:
            for spec in contract.inputs + contract.outputs:
                assert spec.name.startswith(contract.name + "_"), spec.name
