"""Device error records become precise Python exceptions (epcomm.runtime.errstate), on the CPU.

The kernels write an ErrorRecord into host-mapped memory; here the record lives in ordinary
host memory, filled the way cuda_src/epcomm_common.cuh's report_error fills it."""
from __future__ import annotations

import ctypes

import pytest

from epcomm.runtime import errstate
from epcomm.errors import BufferStateError, EpcommError, EpcommTimeoutError, RankMismatchError
from epcomm.kernels import intranode as K_intra


def _state(code, rank=1, phase=11, channel=-1, peer=0, expected=0, observed=0):
    return errstate.ErrorState(0, record=errstate.ErrorRecord(code, rank, phase, channel, peer, 0, expected,
                                                              observed))


def test_error_record_matches_the_device_struct():
    # u32 x 6, two u64, then the bad-index slot: the layout report_error writes (the device
    # side static_asserts the size).
    assert ctypes.sizeof(errstate.ErrorRecord) == 64
    assert errstate.ErrorRecord.expected.offset == 24
    assert errstate.ErrorRecord.bad_code.offset == 40 and errstate.ErrorRecord.bad_value.offset == 56


def test_timeout_names_rank_phase_channel_peer_and_poisons():
    st = _state(errstate.ERR_TIMEOUT, rank=3, phase=13, channel=7, peer=2, expected=5, observed=4)
    with pytest.raises(EpcommTimeoutError) as ei:
        st.check("dispatch")
    msg = str(ei.value)
    assert "rank 3" in msg and "waiting for a chunk of rows" in msg and "channel 7" in msg and "peer rank 2" in msg
    assert (ei.value.rank, ei.value.channel, ei.value.peer) == (3, 7, 2)
    with pytest.raises(BufferStateError, match="unusable after an earlier error"):
        st.check("combine")


@pytest.mark.parametrize("field", K_intra.MAILBOX_AGREE_FIELDS)
def test_shape_mismatch_names_the_field_both_values_and_poisons(field):
    f = K_intra.MAILBOX_AGREE_FIELDS.index(field)
    st = _state(errstate.ERR_MISMATCH, rank=0, phase=11, channel=f, peer=1, expected=8,
                observed=ctypes.c_uint32(-1).value)
    with pytest.raises(RankMismatchError) as ei:
        st.check("dispatch")
    e = ei.value
    assert (e.rank, e.peer, e.field, e.mine, e.theirs) == (0, 1, field, 8, -1)
    assert f"{field}" in str(e) and "is 8 here and -1 there" in str(e) and "rank 1" in str(e)
    with pytest.raises(BufferStateError):
        st.check("dispatch")


def test_a_record_being_written_is_read_once_its_code_is_final():
    # report_error claims the record (code -1), fills the fields, then writes the code: a host
    # that polls in between must not take the claim for a timeout (seen on 2x H200: a
    # num_topk mismatch raised as EpcommTimeoutError with the mismatch's fields).
    import threading
    import time
    f = K_intra.MAILBOX_AGREE_FIELDS.index("num_topk")
    st = _state(-1, rank=1, phase=11, channel=f, peer=0, expected=4, observed=8)
    assert st.aborting()
    writer = threading.Timer(0.02, lambda: setattr(st.rec, "code", errstate.ERR_MISMATCH))
    t0 = time.monotonic()
    writer.start()
    with pytest.raises(RankMismatchError) as ei:
        st.check("dispatch")
    writer.join()
    assert ei.value.field == "num_topk" and (ei.value.mine, ei.value.theirs) == (4, 8)
    assert time.monotonic() - t0 < 0.1 + 0.05


def test_a_record_left_claimed_is_reported_after_a_bounded_wait():
    # A kernel that died mid-write leaves -1: reported as what the fields say, not a hang.
    st = _state(-1, rank=2, phase=13, channel=3, peer=1, expected=5, observed=4)
    with pytest.raises(EpcommTimeoutError, match="channel 3, peer rank 1"):
        st.check("dispatch")


def _bad(st, token, limit, value, code=errstate.ERR_BAD_INPUT):
    st.rec.bad_code, st.rec.bad_token, st.rec.bad_limit, st.rec.bad_value = code, token, limit, value
    return st


def test_bad_input_is_a_value_error_and_leaves_the_state_usable():
    st = _bad(_state(0), 12, 64, 99)
    assert st.pending() and not st.aborting()
    with pytest.raises(ValueError, match="expert index 99 .token 12., outside \\[-1, 64\\)"):
        st.check()
    assert st.rec.bad_code == 0 and st.poisoned is None
    st.check()  # nothing pending any more
    assert _bad(_state(0), 1, 64, 70, code=-1).to_exception() is None  # still being written


def test_a_bad_index_only_warns_at_the_start_of_a_collective_call():
    # The call that saw it completed on every rank; raising at the start of the next collective
    # call would strand this rank's peers in it until their timeout.
    st = _bad(_state(0), 12, 64 | (32 << 32), 99)
    with pytest.warns(RuntimeWarning, match="low_latency_dispatch.*expert index 99 .token 12."):
        st.check("low-latency call", collective=True)
    assert st.rec.bad_code == 0 and st.poisoned is None
    st.check()  # reported once
    # a recorded timeout still raises there
    with pytest.raises(EpcommTimeoutError):
        _state(errstate.ERR_TIMEOUT, rank=0, phase=31, channel=0, peer=1).check("x", collective=True)


def test_a_bad_index_names_the_kernel_that_saw_it():
    # report_error puts the phase above num_experts in bad_limit (the record has no spare field)
    for phase, name in ((0, "get_dispatch_layout"), (1, "get_dispatch_layout"), (32, "low_latency_dispatch"),
                        (43, "low_latency_combine")):
        st = _bad(_state(0), 7, 288 | (phase << 32), -3)
        with pytest.raises(ValueError, match=f"^{name}.*expert index -3 .token 7., outside \\[-1, 288\\)"):
            st.check()


def test_a_timeout_after_a_bad_index_is_recorded_and_poisons():
    # the bad index has its own slot, so the record of a later timeout is not lost behind it
    st = _bad(_state(errstate.ERR_TIMEOUT, rank=0, phase=13, channel=2, peer=1), 5, 64, 64)
    assert st.aborting()
    with pytest.raises(EpcommTimeoutError):
        st.check()
    with pytest.raises(BufferStateError):
        st.check()


def test_overflow_and_unknown_codes():
    with pytest.raises(EpcommError, match="received 900 tokens but the output has only 512 rows"):
        _state(errstate.ERR_OVERFLOW, rank=0, phase=13, expected=512, observed=900).check()
    with pytest.raises(EpcommError, match="device error code 77"):
        _state(77).check()


def test_every_device_phase_has_a_host_description():
    import re
    from pathlib import Path
    src = (Path(__file__).resolve().parents[2] / "cuda_src" / "epcomm_common.cuh").read_text()
    phases = {int(v) for v in re.findall(r"kPhase\w+ = (\d+)", src)}
    assert phases and phases <= set(errstate.PHASES)
    codes = dict(re.findall(r"(kErr\w+) = (\d+)", src))
    assert int(codes["kErrMismatch"]) == errstate.ERR_MISMATCH
    assert int(codes["kErrTimeout"]) == errstate.ERR_TIMEOUT


def test_low_latency_shape_words_round_trip_and_name_the_difference():
    from epcomm.kernels import low_latency as K_ll
    mine = K_ll.shape_word(128, 7168, 256, 8, True, True, False)
    theirs = K_ll.shape_word(256, 7168, 256, 8, True, True, False)
    assert K_ll.unpack_shape_word(mine) == {"num_max_dispatch_tokens_per_rank": 128, "hidden": 7168,
                                            "num_experts": 256, "num_topk": 8, "use_fp8": 1, "round_scale": 1,
                                            "use_ue8m0": 0, "EPCOMM_LL_FORCE_NVSHMEM_PUT": 0,
                                            "EPCOMM_LL_COMBINE_PARTIALS": 1}
    # the transport settings decide how combine rows travel: ranks must agree on them too
    other = K_ll.shape_word(128, 7168, 256, 8, True, True, False, False, False)
    st2 = _state(errstate.ERR_MISMATCH, rank=1, phase=31, channel=0, peer=0, expected=mine, observed=other)
    with pytest.raises(RankMismatchError, match="EPCOMM_LL_COMBINE_PARTIALS is 1 here and 0 there"):
        st2.check("low-latency call")
    with pytest.raises(ValueError, match="num_max_dispatch_tokens_per_rank=1048576"):
        K_ll.shape_word(1 << 20, 7168, 256, 8, True, False, False)
    st = _state(errstate.ERR_MISMATCH, rank=0, phase=31, channel=1, peer=1, expected=mine, observed=theirs)
    with pytest.raises(RankMismatchError) as ei:
        st.check("low-latency call")
    e = ei.value
    assert (e.field, e.mine, e.theirs, e.peer) == ("num_max_dispatch_tokens_per_rank", 128, 256, 1)
    assert "num_max_dispatch_tokens_per_rank is 128 here and 256 there" in str(e)
    assert "hidden" not in str(e).split("Every rank")[0]  # only the fields that differ


def test_low_latency_receive_timeouts_count_the_peers_blocks():
    st = _state(errstate.ERR_TIMEOUT, rank=1, phase=41, channel=0, peer=0, expected=132, observed=57)
    with pytest.raises(EpcommTimeoutError, match="57 of the peer's 132 blocks had arrived"):
        st.check("low-latency call")
    st = _state(errstate.ERR_TIMEOUT, rank=1, phase=31, channel=1, peer=0, expected=0, observed=0)
    with pytest.raises(EpcommTimeoutError, match="0 of the peer's unknown number of blocks had arrived"):
        st.check("low-latency call")
    st = _state(errstate.ERR_TIMEOUT, rank=1, phase=40, channel=1, peer=0, expected=7, observed=6)
    with pytest.raises(EpcommTimeoutError, match="expected flag >= 7, saw 6"):
        st.check("low-latency call")


def test_only_errors_that_stop_the_kernels_abort_a_wait():
    # mirrors aborted() in epcomm_common.cuh: only the main record's code stops waiters
    for code, stops in ((0, False), (-1, True), (errstate.ERR_TIMEOUT, True), (errstate.ERR_OVERFLOW, True),
                        (errstate.ERR_MISMATCH, True)):
        assert _state(code).aborting() is stops, code
        assert _bad(_state(code), 3, 64, 70).aborting() is stops, code


def test_a_timeout_recorded_while_a_bad_index_is_reported_is_not_lost(monkeypatch):
    """check() decides from one read of the code: a kernel recording a timeout just after it
    (while the bad index is being reported) must find it still there at the next check."""
    st = _state(0)
    _bad(st, token=3, limit=64, value=70)
    orig = errstate.ErrorState.to_exception

    def racing(self, context="", code=None):
        exc = orig(self, context, code)
        self.rec.code, self.rec.rank, self.rec.phase = errstate.ERR_TIMEOUT, 1, 13  # the kernel, meanwhile
        return exc

    monkeypatch.setattr(errstate.ErrorState, "to_exception", racing)
    with pytest.raises(ValueError, match="expert index 70"):
        st.check("dispatch")
    monkeypatch.setattr(errstate.ErrorState, "to_exception", orig)
    with pytest.raises(EpcommTimeoutError):
        st.check("dispatch")


def test_a_stalled_nvshmem_collective_is_reported_with_rank_and_phase(monkeypatch, capsys):
    import time

    from epcomm.runtime import nvshmem as nvr
    monkeypatch.setenv("EPCOMM_GROUP_TIMEOUT_S", "0.05")
    with nvr._stall_report("NVSHMEM initialisation (nvshmem.core.init)", 3, 4):
        time.sleep(0.3)  # a peer that never arrives
    err = capsys.readouterr().err
    assert "rank 3 of 4: NVSHMEM initialisation (nvshmem.core.init) still waiting" in err
    with nvr._stall_report("quick", 0, 2):
        pass
    time.sleep(0.1)
    assert capsys.readouterr().err == ""  # finished in time: nothing said
