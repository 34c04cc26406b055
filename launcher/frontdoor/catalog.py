"""The front door's names and profiles at run time: labels (names and aliases), adding, replacing
and forgetting a profile, and compiling it ahead. Part of :class:`launcher.frontdoor.door.FrontDoor`
(see core.py)."""

from __future__ import annotations

from launcher.errors import NotFound
from launcher.frontdoor.compile_ahead import Compiled, needs_compile
from launcher.frontdoor.core import (
    DoorCore,
    log,
)
from launcher.frontdoor.lifecycle import Phase
from launcher.frontdoor.model_state import (
    ModelInvalid,
    ModelState,
)
from launcher.frontdoor.profiles import ModelProfile, ProfileError, check_name


class Catalog(DoorCore):
    """Model names and aliases, and profile changes while the launcher runs."""

    # ------------------------------------------------------------------ names

    def resolve(self, label: str) -> ModelState | None:
        """The model a client means by ``label`` (a name or an alias)."""
        name = self._labels.get(label)
        return self._states.get(name) if name is not None else None

    def states(self) -> list[ModelState]:
        """Every model, in the order they were added."""
        return list(self._states.values())

    def labels(self) -> list[tuple[str, ModelState]]:
        """Every name and alias with its model (what ``/v1/models`` lists)."""
        return [(label, self._states[name]) for label, name in self._labels.items()]

    def _add(self, name: str, profile: ModelProfile) -> ModelState:
        state = ModelState(name=name, profile=profile, compiled=not needs_compile(profile))
        self._states[name] = state
        for label in [name, *profile.aliases]:
            self._labels[label] = name
        return state

    def _warn_if_open(self, name: str, profile: ModelProfile) -> None:
        host = profile.host()
        if (
            host is not None
            and host not in ("127.0.0.1", "localhost", "::1")
            and (self._settings.api_token or self._settings.api_token_file)
        ):
            log.warning(
                "model %s: its options set --host %s, so its instance answers on that address without the "
                "launcher's token; leave --host out to keep it on loopback (reached through the front door only)",
                name,
                host or "(all addresses)",
            )

    def check_labels(self, name: str, profile: ModelProfile) -> None:
        """:class:`ProfileError` if the name or an alias is another model's (or no name at all)."""
        check_name(name)
        for label in [name, *profile.aliases]:
            owner = self._labels.get(label)
            if owner is not None and owner != name:
                raise ProfileError(f"model name {label!r} is already used by model {owner!r}")

    def drop_aliases(self, name: str) -> None:
        """Let go of the model's aliases (a reload gives it its new ones with :meth:`put_profile`)."""
        for label in [label for label, owner in self._labels.items() if owner == name and label != name]:
            del self._labels[label]

    def put_profile(self, name: str, profile: ModelProfile, *, compile_ahead: bool = True) -> tuple[ModelState, bool]:
        """Add or replace a profile; True if it is new. A running instance with another
        configuration is stopped once no request is in flight; the next request starts the new one.
        ``compile_ahead``: compile it ahead now (False: once :meth:`check_runnable` finds it valid)."""
        self.check_labels(name, profile)
        self._warn_if_open(name, profile)
        state = self._states.get(name)
        if state is None:
            state = self._add(name, profile)
            if self._auto_compile and compile_ahead:
                self._compile_ahead(state)
            return state, True
        for label in [name, *state.profile.aliases]:
            if self._labels.get(label) == name:  # an alias another model has taken meanwhile stays its
                del self._labels[label]
        for label in [name, *profile.aliases]:
            self._labels[label] = name
        running = state.running_profile or state.profile
        if profile.instance_config(name) != running.instance_config(name):
            if state.phase is Phase.STARTING:
                self._cancel_start(state, "replaced")  # its waiters start the new profile instead
            elif state.phase in (Phase.READY, Phase.SLEEPING, Phase.WAKING):
                state.retire = True  # the instance would differ: replace it once idle
        changed = profile.instance_config(name) != state.profile.instance_config(name)
        state.profile = profile
        if changed:
            state.invalid, state.checked = None, False  # a new profile: checked afresh by whoever changed it
        if changed:
            state.compiled, state.compile_error = not needs_compile(profile), None
            if self._auto_compile and compile_ahead:
                self._compile_ahead(state)
        self._notify()
        return state, False

    def forget_profile(self, name: str) -> ModelState:
        """Remove a profile now (new requests get 404); its instance stops with :meth:`stop_removed`."""
        state = self._states.pop(name, None)
        if state is None:
            raise NotFound(f"model {name!r} not found")
        for label in [name, *state.profile.aliases]:
            self._labels.pop(label, None)
        self._compiler.forget(name)
        self._removed.append(state)  # its GPUs and slot stay taken until the instance is gone
        self._notify()
        return state

    def warm(self, state: ModelState) -> None:
        """Compile the model ahead now (``POST .../warm``), unless it is compiled or has nothing to compile;
        :class:`ModelInvalid` if its profile cannot run (nothing is forked for it)."""
        if state.invalid is not None:
            raise ModelInvalid(f"model {state.name!r} cannot be started: {state.invalid}")
        if state.compiled is True or not needs_compile(state.profile):
            return
        if state.phase in (Phase.STARTING, Phase.READY):
            return  # its real instance compiles (or has compiled) it
        self._compile_ahead(state)

    def _compile_ahead(self, state: ModelState) -> None:
        if needs_compile(state.profile) and state.compiled is not True and state.invalid is None:
            self._compiler.request(state.name, state.profile)

    def _compiled(self, name: str, profile: ModelProfile, compiled: Compiled, error: str | None) -> None:
        state = self._states.get(name)
        if state is None or state.profile != profile:
            return  # deleted or replaced meanwhile: the new profile has a compile of its own
        if compiled is not True and state.compiled is True:
            return  # a real instance of it got its engine up meanwhile
        state.compiled, state.compile_error = compiled, error
        self._notify()
