"""``mkd networks``: the table of networks, parameters and feature shapes."""

from __future__ import annotations

from click.testing import CliRunner

from mkd.cli import cli


def test_networks_table():
    result = CliRunner().invoke(cli, ["networks"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "enc" in lines[1] and "recon" in lines[1]
    rows = {line.split()[0]: line for line in lines[3:]}
    assert set(rows) == {"unet", "t1", "t2", "s1", "s2"}
    assert "43.228 M" in rows["t1"] and "3 x 256x256" in rows["t1"]
    assert "0.057 M" in rows["s1"] and "64 x 64x64" in rows["s1"]


def test_networks_options_and_errors():
    runner = CliRunner()
    result = runner.invoke(cli, ["networks", "--size", "32", "--spatial-dims", "3", "--preset", "tiny", "--name", "s2"])
    assert result.exit_code == 0, result.output
    assert "32 x 16x16x16" in result.output  # s2 tiny enc at stride 2
    result = runner.invoke(cli, ["networks", "--size", "8", "--name", "unet"])
    assert result.exit_code == 1 and "Error: unet: input spatial size (8, 8) is too small" in result.output
    result = runner.invoke(cli, ["networks", "--name", "t1", "--features", "16,32,64"])
    assert result.exit_code == 0 and "64 x 64x64" in result.output  # bottleneck 64 at stride 4
    result = runner.invoke(cli, ["networks", "--features", "a,b"])
    assert result.exit_code == 2 and "--features" in result.output


def test_network_table_from_python():
    """The table mkd networks prints is mkd.networks.network_table; a network it cannot build names itself."""
    import pytest

    from mkd.errors import MkdError
    from mkd.networks import network_table

    lines = network_table(["s1", "s2"], "tiny", 32)
    assert lines[0] == "preset tiny, input 3 x 32x32; feature shapes are channels x spatial"
    assert lines[1].split() == ["network", "params", "output", "enc", "bn", "dec", "recon"]
    assert set(lines[2]) == {"-", " "} and [line.split()[0] for line in lines[3:]] == ["s1", "s2"]
    assert lines[3].split()[3:5] == ["1", "x"]  # output: one channel, 32x32
    with pytest.raises(MkdError, match=r"^unet: input spatial size \(8, 8\) is too small"):
        network_table(["unet"], "thesis", 8)
