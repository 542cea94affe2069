"""Fused kernels for the hot paths of the methods (internal; nothing here is
re-exported). Each kernel has a plain-jnp reference of the same signature, which is
also its fallback."""

from .trajectory import KERNELS as KERNELS
from .trajectory import affine_moments as affine_moments
from .trajectory import affine_trajectory as affine_trajectory
from .trajectory import check_block_v as check_block_v
from .trajectory import default_block_v as default_block_v
