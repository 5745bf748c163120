"""apex.transformer.log_util: NeMo sets apex's logging level; there is no apex logger here."""


def set_logging_level(verbosity) -> None:
    del verbosity
