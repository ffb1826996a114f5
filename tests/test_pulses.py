"""Pulse programs: validation, JSON round trip, builders."""

import json

import pytest

from nvmri_bluesky import pulses as P
from nvmri_bluesky.errors import NvmriError
from nvmri_bluesky.pulses import Gate, Program, Pulse


def gate(*pulses, name="g"):
    return Gate(name, tuple(pulses))


LASER = Pulse("laser", 0.0, 3e-6)
READ = (Pulse("laser", 5e-6, 3e-6), Pulse("counter", 5e-6, 3e-7))


@pytest.mark.parametrize(("program", "message"), [
    (Program("p", ()), "has no gates"),
    (Program("p", (gate(Pulse("lazer", 0, 1e-6), *READ),)), "unknown channel 'lazer'"),
    (Program("p", (gate(Pulse("laser", 0, 0.0), *READ),)), "duration must be > 0"),
    (Program("p", (gate(Pulse("laser", 0, -1e-6), *READ),)), "duration must be > 0"),
    (Program("p", (gate(Pulse("laser", -1e-6, 1e-6), *READ),)), "start must be >= 0"),
    (Program("p", (gate(LASER, Pulse("laser", 2e-6, 2e-6), *READ),)),
     "overlapping laser pulses"),
    (Program("p", (gate(LASER),)), "exactly one counter window, has 0"),
    (Program("p", (gate(*READ, Pulse("counter", 6e-6, 1e-7)),)),
     "exactly one counter window, has 2"),
    (Program("p", (gate(LASER, Pulse("counter", 4e-6, 1e-7)),)),
     "counter window is not inside a laser pulse"),
    (Program("p", (gate(LASER, Pulse("rf", 3.5e-6, 1e-7), *READ),)), "not inside the echo"),
    (Program("p", (gate(LASER, Pulse("mw", 3.5e-6, 1e-8), Pulse("mw", 4e-6, 1e-8),
                        Pulse("rf", 4.5e-6, 1e-7), *READ),)), "not inside the echo"),
    (Program("p", (gate(LASER, *READ), gate(LASER, *READ))), "duplicate gate name 'g'"),
    (Program("p", (gate(Pulse("laser", 0, float("nan")), *READ),)), "must be finite"),
])
def test_validation(program, message):
    with pytest.raises(NvmriError, match=message) as info:
        program.validate()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "not valid JSON"),
    ("[]", "expected an object"),
    ('{"gates": [{"name": "g"}]}', r"gates\[0\]: missing key 'pulses'"),
    ('{"gates": [{"name": "g", "pulses": [{"channel": "laser", "start": 0}]}]}',
     "missing key 'duration'"),
    ('{"gates": [{"name": "g", "pulses": [{"channel": "laser", "start": 0, "duration": "1"}]}]}',
     r"pulses\[0\].duration: expected a number"),
    ('{"gates": [], "colour": 1}', "unknown key 'colour'"),
    ('{"gates": []}', "has no gates"),
])
def test_from_json_errors(text, message):
    with pytest.raises(NvmriError, match=message):
        Program.from_json(text)


def test_json_round_trip():
    program = P.deer(4e-6, lock_detunings=(-4e6, 4e6, 1e8))
    text = program.to_json()
    assert Program.from_json(text) == program
    assert Program.from_json(json.loads(text)) == program
    assert Program.from_json(text.encode()) == program
    laser = json.loads(text)["gates"][0]["pulses"][0]
    assert laser == {"channel": "laser", "start": 0.0, "duration": P.LASER_INIT_S}


def test_rabi_sets_mw_lengths():
    pi2, pi = 1 / (4 * P.MW_RABI_HZ), 1 / (2 * P.MW_RABI_HZ)
    assert pi == pytest.approx(25e-9)
    echo = P.echo(2e-6).gate("echo")
    assert [p.duration for p in echo.on("mw")] == pytest.approx([pi2, pi, pi2])
    mw = echo.on("mw")
    assert (mw[1].start - mw[0].stop) + (mw[2].start - mw[1].stop) == pytest.approx(2e-6)
    ramsey = P.ramsey(450e-9, 3e6).gate("ramsey").on("mw")
    assert ramsey[1].start - ramsey[0].stop == pytest.approx(450e-9)
    assert {p.detuning for p in ramsey} == {3e6}
    slow = P.rabi(1e-7, mw_rabi_hz=10e6).gate("dark").on("mw")
    assert slow[0].duration == pytest.approx(50e-9)


def test_builders_gates():
    assert P.cw_odmr((0.0, 1e6, 2e6)).gate_names == ["cw_0", "cw_1", "cw_2"]
    assert P.odmr_comb([-1e6, 0.0, 1e6]).gate_names == ["odmr_0", "odmr_1", "odmr_2"]
    assert P.frequency_lock((-1e6, 1e6)).gate_names == ["lock_0", "lock_1"]
    assert P.rabi(50e-9).gate_names == ["rabi", "bright", "dark"]
    assert P.ramsey(1e-6, references=False).gate_names == ["ramsey"]
    assert P.echo(1e-6).gate_names == ["echo", "bright", "dark"]
    deer = P.deer(4e-6, lock_detunings=(-4e6, 4e6, 1e8))
    assert deer.gate_names == ["signal", "echo", "bright", "dark", "lock_0", "lock_1", "lock_2"]
    assert P.deer(4e-6).gate_names == ["signal", "echo", "bright", "dark"]
    assert P.deer(4e-6, references=False).gate_names == ["signal", "echo"]


def test_deer_structure():
    program = P.deer(4e-6, rf_duration=120e-9, rf_detuning=2e6, lock_detunings=(5e6,))
    signal, echo = program.gate("signal"), program.gate("echo")
    mw, (rf,) = signal.on("mw"), signal.on("rf")
    assert rf.duration == 120e-9 and rf.detuning == 2e6
    assert rf.start + rf.duration / 2 == pytest.approx(mw[1].start + mw[1].duration / 2)
    assert echo.on("mw") == mw and not echo.on("rf")
    assert program.gate("bright").on("mw") == ()
    assert [p.duration for p in program.gate("dark").on("mw")] == pytest.approx([25e-9])
    cw = program.gate("lock_0")
    assert cw.on("mw")[0].detuning == 5e6 and cw.on("mw")[0].overlaps(cw.readout)
    counter = signal.counter
    assert counter.start == signal.readout.start and counter.duration == P.WINDOW_S
    assert program.duration == pytest.approx(sum(g.duration for g in program.gates))
    with pytest.raises(NvmriError, match="not inside the echo"):
        P.deer(20e-9)                      # no room for the 100 ns RF pulse


def test_gate_lookup():
    with pytest.raises(NvmriError, match="has no gate 'x'"):
        P.echo(1e-6).gate("x")
