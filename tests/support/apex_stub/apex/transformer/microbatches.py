"""apex.transformer.microbatches.ConstantNumMicroBatches (no batch-size ramp-up)."""


class ConstantNumMicroBatches:
    def __init__(self, global_batch_size: int, micro_batch_size: int, data_parallel_size: int):
        per_step = micro_batch_size * data_parallel_size
        if global_batch_size % per_step:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by micro "
                             f"batch size {micro_batch_size} x data parallel {data_parallel_size}")
        self.num_micro_batches = global_batch_size // per_step
        self.current_global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size

    def get(self) -> int:
        return self.num_micro_batches

    def get_current_global_batch_size(self) -> int:
        return self.current_global_batch_size

    def update(self, consumed_samples, consistency_check) -> None:
        del consumed_samples, consistency_check
