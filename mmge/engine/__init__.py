from .checks import DataPathError, check_data_paths
from .launch import init_cpu_distributed, setup_runtime

__all__ = [
    'DataPathError', 'check_data_paths', 'init_cpu_distributed',
    'setup_runtime'
]
