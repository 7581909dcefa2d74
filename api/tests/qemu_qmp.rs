//! The real `qemu.qmp` Python library (what QEMU's own tests and tools use) drives our QMP
//! server over TCP through the lifecycle, against the fake VMM. Skipped, with a note, where
//! `python3 -c 'import qemu.qmp'` fails (`pip install qemu.qmp` to run it).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use api::qmp::QmpServer;
use api::{QmpEndpoint, ShutdownCause, VmEvent};
use common::FakeVmm;

const SCRIPT: &str = r#"
import asyncio, sys
from qemu.qmp import QMPClient, ExecuteError

async def main(host, port, state_file):
    qmp = QMPClient('api-test')
    await qmp.connect((host, port))
    v = qmp.greeting.QMP.version['qemu']
    assert qmp.greeting.QMP.capabilities == [], qmp.greeting.QMP.capabilities
    assert set(v) == {'major', 'minor', 'micro'}, v
    st = await qmp.execute('query-status')
    assert st == {'running': True, 'singlestep': False, 'status': 'running'}, st
    with qmp.listener() as events:
        assert await qmp.execute('stop') == {}
        ev = await asyncio.wait_for(events.get(), 5)
        assert ev['event'] == 'STOP', ev
        assert (await qmp.execute('query-status'))['status'] == 'paused'
        await qmp.execute('cont')
        ev = await asyncio.wait_for(events.get(), 5)
        assert ev['event'] == 'RESUME', ev
        out = await qmp.execute('human-monitor-command', {'command-line': 'info status'})
        assert out == 'VM status: running\r\n', repr(out)
        try:
            await qmp.execute('frobnicate')
            raise AssertionError('no error')
        except ExecuteError as e:
            assert e.error_class == 'CommandNotFound', e
        try:
            await qmp.execute('stop', {'now': True})
            raise AssertionError('no error')
        except ExecuteError as e:
            assert e.error_class == 'GenericError' and 'unexpected' in str(e), e
        cpus = await qmp.execute('query-cpus-fast')
        assert cpus[0]['qom-path'] == '/machine/unattached/device[0]', cpus
        await qmp.execute('system_reset')
        ev = await asyncio.wait_for(events.get(), 5)
        assert ev['event'] == 'RESET' and ev['data']['reason'] == 'host-qmp-system-reset', ev
        await qmp.execute('system_powerdown')
        ev = await asyncio.wait_for(events.get(), 5)
        assert ev['event'] == 'POWERDOWN', ev
        assert await qmp.execute('query-migrate') == {}
        await qmp.execute('migrate-set-capabilities',
                          {'capabilities': [{'capability': 'events', 'state': True}]})
        assert await qmp.execute('migrate', {'uri': 'file:' + state_file}) == {}
        seen = [(await asyncio.wait_for(events.get(), 5)) for _ in range(4)]
        assert [e['event'] for e in seen] == ['STOP'] + ['MIGRATION'] * 3, seen
        assert [e['data']['status'] for e in seen[1:]] == ['setup', 'active', 'completed'], seen
        info = await qmp.execute('query-migrate')
        assert info['status'] == 'completed' and info['ram']['remaining'] == 0, info
        assert (await qmp.execute('query-status'))['status'] == 'postmigrate'
        try:
            await qmp.execute('migrate', {'uri': 'tcp:127.0.0.1:1'})
            raise AssertionError('no error')
        except ExecuteError as e:
            assert 'paused due to previous migration' in str(e), e
        await qmp.execute('cont')
        ev = await asyncio.wait_for(events.get(), 5)
        assert ev['event'] == 'RESUME', ev
        print('READY', flush=True)
        ev = await asyncio.wait_for(events.get(), 10)
        assert ev['event'] == 'SHUTDOWN', ev
        assert ev['data'] == {'guest': True, 'reason': 'guest-shutdown'}, ev
    try:
        await qmp.disconnect()
    except EOFError:
        pass  # the server closed after SHUTDOWN, as QEMU does when it exits
    print('OK', flush=True)

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
"#;

#[test]
fn qemu_qmp_library_drives_the_lifecycle() {
    let has_lib = Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_lib {
        eprintln!("skipped: python3 with qemu.qmp not available (pip install qemu.qmp)");
        return;
    }
    let (vmm, handle) = FakeVmm::start();
    let server = QmpServer::start(
        &[QmpEndpoint::Tcp("127.0.0.1:0".into())],
        handle,
        vmm.events(),
    )
    .unwrap();
    let addr = server.tcp_addrs()[0];
    let state_file = common::tmpdir("qemu-qmp").join("vm.state");
    let mut child = Command::new("python3")
        .args([
            "-c",
            SCRIPT,
            &addr.ip().to_string(),
            &addr.port().to_string(),
            state_file.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().and_then(Result::ok);
    assert_eq!(first.as_deref(), Some("READY"), "the script failed early");
    // The guest powers off: SHUTDOWN is published and the server stops at once.
    vmm.bus
        .publish(VmEvent::Shutdown(ShutdownCause::GuestShutdown));
    server.shutdown();
    let last = lines.next().and_then(Result::ok);
    let status = child.wait().unwrap();
    assert!(status.success(), "qemu.qmp script failed: {status}");
    assert_eq!(last.as_deref(), Some("OK"));
}

const JOBS_SCRIPT: &str = r#"
import asyncio, sys
from qemu.qmp import QMPClient, ExecuteError

async def main(host, port):
    qmp = QMPClient('api-test-jobs')
    await qmp.connect((host, port))
    with qmp.listener() as events:
        args = {'job-id': 'save0', 'tag': 's1', 'vmstate': 'disk0', 'devices': ['disk0', 'disk1']}
        assert await qmp.execute('snapshot-save', args) == {}
        seen = []
        while not seen or seen[-1] != 'JOB_STATUS_CHANGE concluded':
            ev = await asyncio.wait_for(events.get(), 5)
            name = ev['event']
            if name == 'JOB_STATUS_CHANGE':
                assert ev['data']['id'] == 'save0', ev
                name += ' ' + ev['data']['status']
            seen.append(name)
        want = ['JOB_STATUS_CHANGE created', 'JOB_STATUS_CHANGE running', 'STOP', 'RESUME',
                'JOB_STATUS_CHANGE waiting', 'JOB_STATUS_CHANGE pending',
                'JOB_STATUS_CHANGE concluded']
        assert seen == want, seen
        jobs = await qmp.execute('query-jobs')
        assert jobs == [{'id': 'save0', 'type': 'snapshot-save', 'status': 'concluded',
                         'current-progress': 1, 'total-progress': 1}], jobs
        try:
            await qmp.execute('snapshot-save', args)
            raise AssertionError('no error')
        except ExecuteError as e:
            assert str(e) == "Job ID 'save0' already in use", e
        assert await qmp.execute('job-dismiss', {'id': 'save0'}) == {}
        ev = await asyncio.wait_for(events.get(), 5)
        assert ev['data'] == {'id': 'save0', 'status': 'null'}, ev
        try:
            await qmp.execute('job-dismiss', {'id': 'save0'})
            raise AssertionError('no error')
        except ExecuteError as e:
            assert str(e) == 'Job not found', e
        out = await qmp.execute('human-monitor-command', {'command-line': 'info snapshots'})
        assert out.startswith('List of snapshots present on all disks:\r\n'), repr(out)
    await qmp.disconnect()
    print('OK', flush=True)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"#;

#[test]
fn qemu_qmp_library_follows_a_snapshot_job() {
    let has_lib = Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_lib {
        eprintln!("skipped: python3 with qemu.qmp not available (pip install qemu.qmp)");
        return;
    }
    let (vmm, handle) = FakeVmm::start();
    let server = QmpServer::start(
        &[QmpEndpoint::Tcp("127.0.0.1:0".into())],
        handle,
        vmm.events(),
    )
    .unwrap();
    let addr = server.tcp_addrs()[0];
    let out = Command::new("python3")
        .args([
            "-c",
            JOBS_SCRIPT,
            &addr.ip().to_string(),
            &addr.port().to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu.qmp script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");
}
