import pytest

from turboquant.core import TurboQuantConfig
from turboquant.core.paged_layout import PagedLayout
from turboquant.kernels.codec import KernelCodec, PackedBits


@pytest.mark.parametrize("config,head_dim,match", [
    (TurboQuantConfig(key_bits=1), 128, "key_bits"),
    (TurboQuantConfig(value_bits=1), 128, "value_bits"),
    (TurboQuantConfig(key_quantizer="prod"), 128, "mse"),
    (TurboQuantConfig(key_outlier_channels=8), 128, "outlier"),
    (TurboQuantConfig(), 48, "head_dim"),
])
def test_codec_rejects_what_the_kernels_do_not_implement(config, head_dim, match):
    with pytest.raises(ValueError, match=match):
        KernelCodec.from_config(config, head_dim, num_kv_heads=2, block_size=16)


def test_layout_regions_tile_the_page():
    layout = PagedLayout(head_dim=128, key_bits=4, value_bits=3, block_size=16, num_kv_heads=8)
    assert (layout.key_bytes, layout.value_bytes) == (64, 48)
    assert layout.values_offset == 16 * 64
    assert layout.key_norms_offset == 16 * (64 + 48)
    assert layout.value_norms_offset == layout.key_norms_offset + 64
    assert layout.head_page_bytes == layout.value_norms_offset + 64
    assert layout.bytes_per_token == 8 * (64 + 48 + 8)
    with pytest.raises(ValueError, match="block_size"):
        PagedLayout(128, 4, 4, block_size=6, num_kv_heads=1)


def test_packed_bits_groups():
    assert [(p.coords, p.group_bytes) for p in map(PackedBits.of, (2, 3, 4, 8))] == [(4, 1), (8, 3), (2, 1), (1, 1)]
