"""apex.transformer.pipeline_parallel.utils: the global microbatch calculator NeMo reads."""
from apex.transformer.microbatches import ConstantNumMicroBatches

_GLOBAL_NUM_MICROBATCHES_CALCULATOR = None


def setup_microbatch_calculator(rank, rampup_batch_size, global_batch_size, micro_batch_size,
                                data_parallel_size) -> None:
    global _GLOBAL_NUM_MICROBATCHES_CALCULATOR
    if rampup_batch_size:
        raise NotImplementedError("the apex stand-in has no batch-size ramp-up")
    del rank
    _GLOBAL_NUM_MICROBATCHES_CALCULATOR = ConstantNumMicroBatches(
        global_batch_size, micro_batch_size, data_parallel_size)


def _reconfigure_microbatch_calculator(rank, rampup_batch_size, global_batch_size,
                                       micro_batch_size, data_parallel_size) -> None:
    global _GLOBAL_NUM_MICROBATCHES_CALCULATOR
    _GLOBAL_NUM_MICROBATCHES_CALCULATOR = None
    setup_microbatch_calculator(rank, rampup_batch_size, global_batch_size, micro_batch_size,
                                data_parallel_size)


def get_num_microbatches() -> int:
    return _GLOBAL_NUM_MICROBATCHES_CALCULATOR.get()


def get_current_global_batch_size() -> int:
    return _GLOBAL_NUM_MICROBATCHES_CALCULATOR.get_current_global_batch_size()


def get_micro_batch_size() -> int:
    return _GLOBAL_NUM_MICROBATCHES_CALCULATOR.micro_batch_size


def update_num_microbatches(consumed_samples, consistency_check=True) -> None:
    _GLOBAL_NUM_MICROBATCHES_CALCULATOR.update(consumed_samples, consistency_check)
