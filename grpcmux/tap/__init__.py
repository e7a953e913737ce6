"""twistd glue shared by ``grpcmux-server`` and ``grpcmux-client``.

Options: the flags are declared with no usage.Options default (so "given" is
``self[name] is not None``) and their default is written into the help text;
``postOptions`` hands only the given flags to :mod:`grpcmux.config`, which applies
flag > GRPCMUX_* environment > YAML file > default.

Logging under twistd: twistd builds the service (``makeService``), adds it to its
Application and only then starts logging, asking the Application for an
``ILogObserver`` component unless ``--logger`` was given.  ``makeService`` returns
a :class:`TwistdRoot` that sets that component when it is added to the
Application: an observer that filters by ``--log-level`` and writes
``--log-format`` to where twistd would write (``--logfile``, stdout with
``--nodaemon``, ``twistd.log``, or syslog with ``--syslog``).  An explicit
``--logger`` still wins.  Python ``logging`` (grpcio) is bridged into the same
path while the service runs.

Mistakes end in one line, never twistd's whole usage or a traceback: a bad or
abbreviated option or a bad setting (``parseOptions``), and a listener that cannot
be had (:class:`~grpcmux.listening.StartupError`, caught in ``TwistdRoot``).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

from twisted.application.service import IService, MultiService
from twisted.internet.error import ReactorNotRunning
from twisted.logger import ILogObserver, Logger, LegacyLogObserverWrapper
from twisted.python import usage
from twisted.python.components import Componentized

from grpcmux import config
from grpcmux import logging as grpcmux_logging
from grpcmux.listening import StartupError
from grpcmux.malloc import tune_malloc


def _help(option: Any, default: Any, stem: str) -> str:
    text = option.help.format(stem=stem, etc=config.DEFAULT_ETC_DIR)
    if option.flag == "config":
        return text
    if option.flag == "label":
        return text + " [default: none]"
    shown = default if default is not None else (option.shown_default or "none")
    if isinstance(shown, float) and shown == int(shown):
        shown = int(shown)
    return f"{text} [default: {shown}]"


def option_table(
    options: Sequence[Any], settings_class: type, stem: str
) -> list:
    """usage.Options optParameters for every option except the repeatable --label."""
    return [
        [o.flag, None, None, _help(o, config.default_of(settings_class, o), stem)]
        for o in options
        if o.kind not in ("labels", "bool")
    ]


def flag_table(options: Sequence[Any]) -> list:
    """usage.Options optFlags for the on/off options (given: on)."""
    return [[o.flag, None, o.help] for o in options if o.kind == "bool"]


class SettingsOptions(usage.Options):
    """Base of the two taps' Options: collects given flags, loads the settings.

    *environ*, *home* and *etc_dir* are injectable for tests; twistd passes none
    and gets ``os.environ``, ``$HOME`` and ``config.DEFAULT_ETC_DIR``.
    """

    _config_options: Sequence[Any] = ()
    _loader: Callable[..., Any]

    def __init__(
        self,
        environ: Optional[Mapping[str, str]] = None,
        home: Optional[str] = None,
        etc_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        self._environ = environ
        self._home = home
        self._etc_dir = etc_dir
        self.settings: Any = None
        self.warnings: list = []  # logged once logging is set up

    def parseOptions(self, options: Optional[Sequence[str]] = None) -> None:
        """Parse exact option names only; under twistd, a mistake is one line.

        twistd answers a UsageError with the whole usage (about 100 lines) before
        the one useful line; the line and a pointer to ``--help`` are enough.
        """
        argv = sys.argv[1:] if options is None else list(options)
        try:
            self._refuse_abbreviations(argv)
            super().parseOptions(argv)
        except usage.UsageError as error:
            if self.parent is None:
                raise  # called directly (tests, tools): the caller reports it
            command = f"twistd {self.parent.subCommand}"
            sys.stderr.write(f"{command}: {error} (see '{command} --help')\n")
            raise SystemExit(1)

    def _refuse_abbreviations(self, argv: Sequence[str]) -> None:
        """getopt takes any unique prefix (``--proxy-listen``); take whole names.

        Scans *argv* as getopt does: up to ``--`` or the first non-option, skipping
        the values of options that take one.  (The taps have no short options;
        getopt refuses any.)
        """
        names = {name.rstrip("=") for name in self.longOpt}
        takes_value = {name[:-1] for name in self.longOpt if name.endswith("=")}
        args = iter(argv)
        for arg in args:
            if arg == "--" or not arg.startswith("--"):
                return
            name, equals, _ = arg[2:].partition("=")
            if name not in names:
                close = config.nearest(name, names)
                hint = f"; did you mean --{close}?" if close else ""
                raise usage.UsageError(f"no such option --{name}{hint}")
            if name in takes_value and not equals:
                next(args, None)

    def given_flags(self) -> dict:
        """The options given on the command line, by attribute name."""
        given = {}
        for option in self._config_options:
            value = self.get(option.flag)
            if option.kind == "bool":
                value = True if value else None  # an absent flag says nothing
            if value is not None and value != []:
                given[option.attr] = value
        return given

    def postOptions(self) -> None:
        try:
            self.settings = self._loader(
                self.given_flags(),
                environ=self._environ,
                home=self._home,
                etc_dir=self._etc_dir or config.DEFAULT_ETC_DIR,
            )
        except config.ConfigError as error:
            raise usage.UsageError(str(error))
        self.warnings = config.environment_warnings(self._environ)


class TwistdRoot(MultiService):
    """The service twistd gets: wraps the real one and sets up logging.

    On being added to twistd's Application it offers the Application an
    ``ILogObserver`` (see the module docstring); while running it bridges Python
    ``logging`` into twisted.logger at the configured level.
    """

    _log = Logger()

    def __init__(
        self, service: IService, settings: Any, twistd_options: Any, reactor: Any = None
    ) -> None:
        super().__init__()
        self.settings = settings
        self._twistd_options = twistd_options
        self._reactor = reactor
        self.observer: Optional[ILogObserver] = None
        service.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        if isinstance(parent, Componentized) and (
            parent.getComponent(ILogObserver, None) is None
        ):
            self.observer = twistd_observer(
                self._twistd_options, self.settings.log_level, self.settings.log_format
            )
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)

    def startService(self) -> None:
        grpcmux_logging.bridge_stdlib_logging(self.settings.log_level)
        try:
            super().startService()
        except StartupError as error:
            grpcmux_logging.unbridge_stdlib_logging()
            if self._twistd_options is None:
                raise  # not under twistd: the caller reports it
            self._fail_start(str(error))
        if self._reactor is not None:  # the reactor installs its handlers during startup
            self._reactor.addSystemEventTrigger("after", "startup", self.take_stop_signals)

    def _fail_start(self, message: str) -> None:
        """End twistd with *message* as its one line, status 1, no traceback.

        Logged at error level; shown on stderr as well unless the log already goes
        to stdout; a daemonizing twistd's parent gets it through its status pipe
        (cut at a word, as the pipe takes 100 bytes).  The pid file twistd wrote is
        removed, as twistd does on its own failures.
        """
        self._log.error("{message}", message=message)
        options = self._twistd_options
        pidfile = options.get("pidfile")
        if pidfile:  # first: a daemonizing twistd's parent exits on the status pipe
            try:
                os.unlink(pidfile)
            except OSError:
                pass
        status_pipe = options.get("statusPipe")
        if status_pipe is not None:
            options["statusPipe"] = None
            os.write(status_pipe, b"1 " + _cut(message.encode("ascii", "replace"), 98))
            os.close(status_pipe)
        elif self.observer is None or not _logs_to_stdout(options):
            # twistd has pointed sys.stderr at the log by now: the terminal's is __stderr__
            sys.__stderr__.write(message + "\n")
            sys.__stderr__.flush()
        raise SystemExit(1)

    def take_stop_signals(self) -> None:
        """Handle SIGTERM and SIGINT in place of the reactor, so that twistd exits 0.

        The reactor's handlers stop it and remember the signal, and twistd then
        ends by killing itself with that signal.  An operator's SIGTERM (systemd
        stop) or Ctrl-C stops the service gracefully: a normal end, for which
        scripts and unit files expect status 0.  Ours stop the reactor the same
        way and remember nothing.  A signal the reactor does not handle (SIGINT
        under a debugger) is left alone.
        """
        for number in (signal.SIGTERM, signal.SIGINT):
            if getattr(signal.getsignal(number), "__self__", None) is self._reactor:
                signal.signal(number, self._stop_signalled)

    def _stop_signalled(self, number: int, frame: Any) -> None:
        self._reactor.callFromThread(self._stop_reactor, signal.Signals(number).name)

    def _stop_reactor(self, name: str) -> None:
        self._log.info("Received {signal}, shutting down.", signal=name)
        try:
            self._reactor.stop()
        except ReactorNotRunning:
            pass  # a second signal while the service drains

    def stopService(self):
        d = super().stopService()

        def unbridge(result):
            grpcmux_logging.unbridge_stdlib_logging()
            return result

        d.addBoth(unbridge)
        return d


def _cut(text: bytes, limit: int) -> bytes:
    """*text*, cut at a space with "..." if longer than *limit* bytes."""
    if len(text) <= limit:
        return text
    return text[:limit - 3].rsplit(b" ", 1)[0] + b"..."


def twistd_observer(twistd_options: Any, level: str, fmt: str) -> ILogObserver:
    """The observer twistd should log to: twistd's destination, our level/format.

    *twistd_options* is twistd's ServerOptions (the tap Options' ``parent``) or
    None (stdout).  Destination rules follow twistd's own: ``--syslog`` (format
    left to syslog), ``--logfile=-`` or ``--nodaemon`` without ``--logfile``:
    stdout; otherwise ``--logfile`` (default ``twistd.log``), rotated on SIGUSR1.
    """
    opts = twistd_options if twistd_options is not None else {}
    if opts.get("syslog"):
        from twisted.python import syslog

        legacy = syslog.SyslogObserver(opts.get("prefix") or "twisted").emit
        return grpcmux_logging.filter_observer(LegacyLogObserverWrapper(legacy), level)
    logfile = opts.get("logfile") or ""
    if twistd_options is None or _logs_to_stdout(opts):
        out = sys.stdout
    else:
        from twisted.python.logfile import LogFile

        out = LogFile.fromFullPath(os.path.abspath(logfile or "twistd.log"))
        _rotate_on_sigusr1(out)
    return grpcmux_logging.make_observer(out, level, fmt)


def _logs_to_stdout(twistd_options: Any) -> bool:
    """Whether twistd's log goes to stdout (``--logfile=-``, or -n without one)."""
    if twistd_options.get("syslog"):
        return False
    logfile = twistd_options.get("logfile") or ""
    return logfile == "-" or bool(twistd_options.get("nodaemon") and not logfile)


def _rotate_on_sigusr1(logfile: Any) -> None:
    """Rotate *logfile* on SIGUSR1 unless someone handles that signal already."""
    import signal

    if signal.getsignal(signal.SIGUSR1) in (None, signal.SIG_DFL):

        def rotate(signum, frame):
            from twisted.internet import reactor

            reactor.callFromThread(logfile.rotate)

        signal.signal(signal.SIGUSR1, rotate)


def make_twistd_service(
    options: SettingsOptions, service: IService, reactor: Any = None
) -> TwistdRoot:
    """Wrap *service* for twistd and log which config file the settings came from.

    glibc's malloc thresholds are fixed here, for the whole process (see grpcmux.malloc).
    """
    settings = options.settings
    root = TwistdRoot(service, settings, getattr(options, "parent", None), reactor)
    log = Logger(namespace="grpcmux.tap")
    tune_malloc()
    if settings.config:
        log.info("using config file {config_file}", config_file=settings.config)
    else:
        log.info("no config file found; using flags, environment and defaults")
    for warning in getattr(options, "warnings", ()):
        log.warn("{warning}", warning=warning)
    return root
