"""Every permission, decided in one place."""

from __future__ import annotations

import pytest

from chitrakar.buttons import Action, ButtonPress, InvalidButton, parse_button, review_buttons
from chitrakar.permissions import GRANTS, Permission, Role, may, role_of

MEMBER_MAY = {Permission.GENERATE, Permission.REPORT}
GROUP_ADMIN_MAY = MEMBER_MAY | {Permission.GROUP_SETTINGS, Permission.GROUP_QUOTA}


@pytest.mark.parametrize("permission", list(Permission))
def test_each_role_may_exactly_what_it_should(permission: Permission) -> None:
    assert may(Role.MEMBER, permission) is (permission in MEMBER_MAY)
    assert may(Role.GROUP_ADMIN, permission) is (permission in GROUP_ADMIN_MAY)
    assert may(Role.BOT_ADMIN, permission)


def test_a_banned_user_may_do_nothing_but_a_bot_admin_is_never_banned() -> None:
    for permission in Permission:
        assert not may(Role.MEMBER, permission, banned=True)
        assert not may(Role.GROUP_ADMIN, permission, banned=True)
        assert may(Role.BOT_ADMIN, permission, banned=True)


def test_roles() -> None:
    admins = frozenset({"1"})
    assert role_of("1", admins, is_group_admin=False) == Role.BOT_ADMIN
    assert role_of("1", admins, is_group_admin=True) == Role.BOT_ADMIN
    assert role_of("2", admins, is_group_admin=True) == Role.GROUP_ADMIN
    assert role_of("2", admins, is_group_admin=False) == Role.MEMBER
    assert set(GRANTS) == set(Role)


@pytest.mark.parametrize(
    "data",
    [
        "g:c:portrait:off",
        "g:s:anime:on",
        "g:p:default",
        "g:p:spoiler",
        "g:x:on",
        "g:q:off",
        "g:q:50",
    ],
)
def test_setting_buttons_round_trip(data: str) -> None:
    press = parse_button(data)
    assert press.action == Action.SETTING and press.data == data


@pytest.mark.parametrize(
    "data",
    [
        "g:",
        "g:c:",
        # A command or style names the state asked for (an older /settings message's
        # buttons did not): a press is never a toggle.
        "g:c:portrait",
        "g:s:anime",
        "g:c:portrait:maybe",
        "g:p:maybe",
        "g:x:yes",
        "g:q:0",
        "g:q:-1",
        "g:q:999999",
        "g:z:1",
        "w:1:z",
        "w:0:d",
    ],
)
def test_forged_setting_and_review_buttons_are_invalid(data: str) -> None:
    with pytest.raises(InvalidButton):
        parse_button(data)


def test_review_buttons_round_trip() -> None:
    presses = [button.press for row in review_buttons(42) for button in row]
    assert [p.value for p in presses] == ["dismissed", "deleted", "banned"]
    assert all(parse_button(p.data) == p for p in presses)
    assert parse_button("w:42:x") == ButtonPress(Action.REVIEW, job_id=42, value="deleted")
