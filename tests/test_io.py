import h5py
import numpy as np
import pytest

from caloman.errors import InvalidEnergyError, ShowerFileError, VoxelCountError
from caloman.io import ShowerFile, ShowerWriter, load_showers, read_voxel_count, write_showers


def _data(n=10, v=368, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(256, 4096, n), rng.gamma(0.5, 10.0, (n, v)).astype(np.float32)


def _raw(path, inc, sh):
    with h5py.File(path, "w") as f:
        if inc is not None:
            f["incident_energies"] = inc
        if sh is not None:
            f["showers"] = sh


def test_round_trip_and_chunks(tmp_path):
    inc, sh = _data(1000)
    p = write_showers(tmp_path / "a.h5", inc, sh, binning="ds1-photons")
    with h5py.File(p) as f:
        assert f["incident_energies"].shape == (1000, 1)
        assert f["showers"].compression == "gzip"
    inc2, sh2 = load_showers(p, "ds1-photons")
    assert np.allclose(inc2, inc.astype(np.float32))
    assert np.array_equal(sh2, sh)
    with ShowerFile(p, "ds1-photons") as f:
        chunks = list(f.iter_chunks(chunk_size=300))
    assert [len(c[0]) for c in chunks] == [300, 300, 300, 100]
    assert np.array_equal(np.concatenate([c[1] for c in chunks]), sh)


def test_writer_is_atomic(tmp_path):
    inc, sh = _data()
    target = tmp_path / "out.h5"
    with pytest.raises(RuntimeError):
        with ShowerWriter(target, 368) as w:
            w.append(inc, sh)
            raise RuntimeError("interrupted")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_bad_values_and_leaves_nothing(tmp_path):
    inc, sh = _data()
    sh[3, 5] = np.nan
    with pytest.raises(InvalidEnergyError, match="shower 3"):
        write_showers(tmp_path / "x.h5", inc, sh)
    assert list(tmp_path.iterdir()) == []


def test_wrong_voxel_count(tmp_path):
    inc, sh = _data(v=533)
    p = write_showers(tmp_path / "pions.h5", inc, sh)
    with pytest.raises(VoxelCountError, match="expected 368 voxels .* file has 533"):
        ShowerFile(p, "ds1-photons")


@pytest.mark.parametrize("which", ["incident_energies", "showers"])
def test_missing_key(tmp_path, which):
    inc, sh = _data()
    p = tmp_path / "m.h5"
    _raw(p, None if which == "incident_energies" else inc[:, None], None if which == "showers" else sh)
    with pytest.raises(ShowerFileError, match=which):
        ShowerFile(p)


def test_shape_mismatch(tmp_path):
    inc, sh = _data()
    p = tmp_path / "s.h5"
    _raw(p, inc[:5, None], sh)
    with pytest.raises(ShowerFileError, match="5 incident energies but 10 showers"):
        ShowerFile(p)


@pytest.mark.parametrize("bad", [np.nan, -1.0, np.inf])
def test_bad_voxel_values(tmp_path, bad):
    inc, sh = _data()
    sh[7, 2] = bad
    p = tmp_path / "v.h5"
    _raw(p, inc[:, None], sh)
    with pytest.raises(InvalidEnergyError, match="shower 7"):
        ShowerFile(p)


@pytest.mark.parametrize("bad", [0.0, -5.0, np.nan])
def test_bad_incident_energies(tmp_path, bad):
    inc, sh = _data()
    inc[4] = bad
    p = tmp_path / "e.h5"
    _raw(p, inc[:, None], sh)
    with pytest.raises(InvalidEnergyError, match="shower 4"):
        ShowerFile(p)


def test_corrupt_and_truncated(tmp_path):
    p = tmp_path / "junk.h5"
    p.write_bytes(b"this is not hdf5" * 100)
    with pytest.raises(ShowerFileError, match="corrupt or truncated"):
        ShowerFile(p)
    inc, sh = _data(2000)
    good = write_showers(tmp_path / "good.h5", inc, sh)
    data = good.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShowerFileError):
        ShowerFile(cut)
    with pytest.raises(ShowerFileError, match="no such file"):
        ShowerFile(tmp_path / "absent.h5")


def test_written_files_have_normal_permissions(tmp_path):
    import os
    inc, sh = _data()
    p = write_showers(tmp_path / "perm.h5", inc, sh)
    umask = os.umask(0)
    os.umask(umask)
    assert (p.stat().st_mode & 0o777) == (0o666 & ~umask)


# -- messages show plain numbers, never numpy reprs such as np.float32(-4.0) ------------
@pytest.mark.parametrize(("bad", "shown"), [(np.nan, "(nan MeV in voxel 2)"), (np.inf, "(inf MeV in voxel 2)"),
                                            (-np.inf, "(-inf MeV in voxel 2)"), (-4.0, "(-4 MeV in voxel 2)"),
                                            (-0.25, "(-0.25 MeV in voxel 2)")])
def test_bad_voxel_messages_show_plain_numbers(tmp_path, bad, shown):
    inc, sh = _data()
    sh[7, 2] = bad  # float32, as read from a file
    p = tmp_path / "v.h5"
    _raw(p, inc[:, None], sh)
    with pytest.raises(InvalidEnergyError) as exc:
        ShowerFile(p)
    assert "np." not in str(exc.value) and "shower 7" in str(exc.value) and shown in str(exc.value)
    with pytest.raises(InvalidEnergyError) as exc:  # the writer's check says the same
        write_showers(tmp_path / "w.h5", inc, sh)
    assert "np." not in str(exc.value) and shown in str(exc.value)


@pytest.mark.parametrize(("bad", "shown"), [(0.0, "is 0 MeV"), (-5.0, "is -5 MeV"), (np.nan, "is nan MeV"),
                                            (np.inf, "is inf MeV"), (-1e-3, "is -0.001 MeV")])
def test_bad_incident_energy_messages_show_plain_numbers(tmp_path, bad, shown):
    inc, sh = _data()
    inc[4] = bad
    p = tmp_path / "e.h5"
    _raw(p, inc[:, None].astype(np.float32), sh)
    with pytest.raises(InvalidEnergyError) as exc:
        ShowerFile(p)
    assert "np." not in str(exc.value) and f"shower 4 {shown};" in str(exc.value)


@pytest.mark.parametrize(("bad", "shown"), [(0.0, "is 0 MeV"), (-4.0, "is -4 MeV"), (np.nan, "is nan MeV")])
def test_simulator_energy_message_shows_plain_numbers(bad, shown):
    from caloman.simulation.simulator import _check_energies

    energies = np.array([1e3, 2e3, bad], dtype=np.float32)
    with pytest.raises(InvalidEnergyError) as exc:
        _check_energies(energies)
    assert "np." not in str(exc.value) and f"incident energy 2 {shown};" in str(exc.value)


def test_read_voxel_count_reads_the_shape_only(tmp_path):
    inc, sh = _data(v=533)
    sh[0, 0] = np.nan  # not read, so not an error here
    p = tmp_path / "n.h5"
    _raw(p, inc[:, None], sh)
    assert read_voxel_count(p) == 533
    with pytest.raises(ShowerFileError, match="no such file"):
        read_voxel_count(tmp_path / "absent.h5")
    _raw(tmp_path / "m.h5", inc[:, None], None)
    with pytest.raises(ShowerFileError, match="showers"):
        read_voxel_count(tmp_path / "m.h5")


def test_load_showers_random_subset_spans_a_sorted_file(tmp_path):
    inc, sh = _data(1000)
    order = np.argsort(inc)
    p = write_showers(tmp_path / "sorted.h5", inc[order], sh[order], binning="ds1-photons")
    first, _ = load_showers(p, "ds1-photons", max_showers=200)
    subset, subset_showers = load_showers(p, "ds1-photons", max_showers=200, subset_seed=3)
    again, _ = load_showers(p, "ds1-photons", max_showers=200, subset_seed=3)
    assert len(subset) == 200 and np.array_equal(subset, again)
    assert np.all(np.diff(subset) >= 0)  # file order kept
    # the first 200 of a sorted file are its lowest energies; a random subset reaches the top
    assert first.max() <= np.sort(inc)[199] + 1e-3 < subset.max()
    rows = np.searchsorted(np.sort(inc.astype(np.float32)), subset)
    assert subset_showers.shape == (200, sh.shape[1]) and len(set(rows.tolist())) > 150
