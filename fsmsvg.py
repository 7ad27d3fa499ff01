"""The state machine as SVG, laid out here from the table (state.TRANSITIONS, through
explain.edges(), the same edges `--fsm` prints): no drawing is stored anywhere.

The layout, computed:
- a state's column is its distance from START over the table's moves (breadth first, in the
  table's order), so a session moves left to right as its transaction goes on;
- in each column the states take rows in table order, each as near as it can to the row of
  the state it is first reached from; a row below the first is shifted half a column right,
  so that the lines down to CLOSED pass between its states;
- a state with no moves out (CLOSED) is a bar along the bottom: every QUIT is a line straight
  down to it;
- a move back (to a column on the left, or up) is an arc over the states between, higher the
  longer it is (a short one up from the row below bends down instead, under the state
  beside it); a move forward sags a little, so that A->B and B->A never overlap; a move to
  the same state is a small loop on top of it.

Every state is a `<g class="state" data-state=NAME>` with a count (`text.count`) and a place
for the markers of its sessions (`g.markers`, with `data-x`/`data-y`); every move is a
`<g class="edge" data-from=A data-to=B>`, so the page's script highlights what a session does.
"""
import collections
import html
import math
from typing import NamedTuple

import explain
import replies
from state import START, TRANSITIONS

COLUMN = 175            # pixels between columns
ROW = 125               # pixels between rows
NODE_WIDTH, NODE_HEIGHT = 110, 40
MARGIN_X, MARGIN_TOP = 170, 150     # room for the entry arrow, and for the arcs above
BAR_HEIGHT = 34                     # the bottom bar (a state with no moves out)
FORWARD_SAG = 0.08                  # a forward move's bend, as a part of its length
BACKWARD_ARC = 0.36                 # a backward move's
LOOP_HEIGHT = 34
ENTRY = "connect"                   # the move into START (explain.draw's "[*] --> START")


class Place(NamedTuple):
    x: float
    y: float
    bar: bool = False               # drawn as the bottom bar


class Edge(NamedTuple):
    source: str
    target: str
    labels: tuple                   # "VERBS / code", as explain.edges() gives them


def merged_edges():
    """explain.edges(), one Edge per (from, to) pair with every label of it."""
    labels = collections.OrderedDict()
    for source, target, label in explain.edges():
        labels.setdefault((source, target), []).append(label)
    return [Edge(source, target, tuple(texts)) for (source, target), texts in labels.items()]


def columns():
    """{state: column}: the breadth-first distance from START (states with no moves out are
    left out: they are the bar)."""
    column, todo = {START: 0}, collections.deque([START])
    while todo:
        state = todo.popleft()
        for target in _targets(state):
            if target not in column and TRANSITIONS[target]:
                column[target] = column[state] + 1
                todo.append(target)
    return column


def _targets(state):
    return [target for source, target, _ in explain.edges() if source == state]


def layout():
    """{state: Place} for every state of the table."""
    column = columns()
    first_from = _first_predecessors(column)
    rows, taken = {}, set()
    for state in TRANSITIONS:
        if state not in column:
            continue
        row = rows.get(first_from.get(state), 0)
        while (column[state], row) in taken:
            row += 1
        rows[state] = row
        taken.add((column[state], row))
    places = {state: Place(MARGIN_X + (column[state] + 0.5 * (rows[state] > 0)) * COLUMN,
                           MARGIN_TOP + rows[state] * ROW)
              for state in rows}
    bottom = MARGIN_TOP + (max(rows.values()) + 1) * ROW
    middle = (min(p.x for p in places.values()) + max(p.x for p in places.values())) / 2
    for state, rules in TRANSITIONS.items():
        if not rules:
            places[state] = Place(middle, bottom, bar=True)
    return places


def _first_predecessors(column):
    """{state: the state of a smaller column it is first reached from}."""
    found = {}
    for source, target, _ in explain.edges():
        if target in column and source in column and column[source] < column[target]:
            found.setdefault(target, source)
    return found


# ---------------------------------------------------------------------------------------
# Drawing


def draw():
    """The whole diagram as one `<svg>` element (text)."""
    places = layout()
    width = max(p.x for p in places.values()) + NODE_WIDTH / 2 + 40
    height = max(p.y for p in places.values()) + BAR_HEIGHT / 2 + 20
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" id="fsm" class="fsm" '
             f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" '
             f'aria-label="The SMTP state machine of state.py">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerUnits="userSpaceOnUse" '
             'markerWidth="9" markerHeight="9" orient="auto-start-reverse">'
             '<path d="M0,0 L10,5 L0,10 z"/></marker></defs>',
             _entry(places[START])]
    bar = next((state for state, place in places.items() if place.bar), None)
    span = _bar_span(places)
    for edge in merged_edges():
        parts.append(_edge(edge, places, span if edge.target == bar else None))
    for state, place in places.items():
        parts.append(_bar(state, place, span) if place.bar else _state(state, place))
    parts.append("</svg>")
    return "\n".join(parts)


def _bar_span(places):
    xs = [p.x for p in places.values() if not p.bar]
    return min(xs) - NODE_WIDTH / 2, max(xs) + NODE_WIDTH / 2


def _entry(start):
    x, y = start.x - NODE_WIDTH / 2, start.y
    label = f"{ENTRY} / {replies.GREETING.code}"
    return (f'<g class="edge entry" data-from="" data-to="{START}">'
            f'<title>{_text(label)}</title>'
            f'<circle cx="{x - 92:.1f}" cy="{y:.1f}" r="6" class="origin"/>'
            f'<path d="M{x - 86:.1f},{y:.1f} L{x - 2:.1f},{y:.1f}" marker-end="url(#arrow)"/>'
            f'<text x="{x - 98:.1f}" y="{y - 12:.1f}" class="label entry-label">'
            f'{_text(label)}</text></g>')


def _state(state, place):
    x, y = place.x, place.y
    left, top = x - NODE_WIDTH / 2, y - NODE_HEIGHT / 2
    return (f'<g class="state" data-state="{_text(state)}" tabindex="0">'
            f'<title>{_text(state)}</title>'
            f'<rect x="{left:.1f}" y="{top:.1f}" width="{NODE_WIDTH}" height="{NODE_HEIGHT}" '
            f'rx="9"/>'
            f'<text x="{x:.1f}" y="{y + 5:.1f}" class="name">{_text(state)}</text>'
            f'<text x="{left + NODE_WIDTH + 3:.1f}" y="{top + 2:.1f}" class="count">0</text>'
            f'<g class="markers" data-x="{x + 10:.1f}" data-y="{top + NODE_HEIGHT + 10:.1f}">'
            f'</g></g>')


def _bar(state, place, span):
    left, right = span
    top = place.y - BAR_HEIGHT / 2
    return (f'<g class="state bar" data-state="{_text(state)}">'
            f'<title>{_text(state)}</title>'
            f'<rect x="{left:.1f}" y="{top:.1f}" width="{right - left:.1f}" '
            f'height="{BAR_HEIGHT}" rx="9"/>'
            f'<text x="{left + 14:.1f}" y="{place.y + 5:.1f}" class="name start">'
            f'{_text(state)}</text>'
            f'<text x="{right - 8:.1f}" y="{top - 4:.1f}" class="count">0</text>'
            f'<g class="markers" data-x="{left + 110:.1f}" data-y="{place.y:.1f}"></g></g>')


def _edge(edge, places, bar_span):
    source, target = places[edge.source], places[edge.target]
    minor = True                        # its label shows on hover, or once taken
    if edge.source == edge.target:
        path, label_at = _loop(source)
    elif bar_span is not None:
        path, label_at = _down_to_bar(source, target)
        minor = False
    else:
        path, label_at = _curve(source, target)
        minor = target.x < source.x or (target.x == source.x and target.y < source.y)
    title = "; ".join(edge.labels)
    label = _short_label(edge)
    return (f'<g class="edge{" minor" if minor else ""}" data-from="{_text(edge.source)}" '
            f'data-to="{_text(edge.target)}">'
            f'<title>{_text(edge.source)} \u2192 {_text(edge.target)}: {_text(title)}</title>'
            f'<path d="{path}" marker-end="url(#arrow)"/>'
            f'<text x="{label_at[0]:.1f}" y="{label_at[1]:.1f}" class="label">'
            f'{_text(label)}</text></g>')


def _short_label(edge):
    """The verbs of a move, without the codes (the title has those), e.g. "HELO, EHLO"."""
    verbs = []
    for label in edge.labels:
        for verb in label.split(" / ")[0].split(", "):
            if verb not in verbs:
                verbs.append(verb)
    text = ", ".join(verbs)
    return text if len(text) <= 28 else ", ".join(verbs[:3]) + ", \u2026"


def _loop(place):
    x, top = place.x, place.y - NODE_HEIGHT / 2
    path = (f"M{x - 16:.1f},{top:.1f} C{x - 34:.1f},{top - LOOP_HEIGHT:.1f} "
            f"{x + 34:.1f},{top - LOOP_HEIGHT:.1f} {x + 16:.1f},{top:.1f}")
    return path, (x, top - LOOP_HEIGHT + 4)


def _down_to_bar(source, bar):
    x = source.x
    start = source.y + NODE_HEIGHT / 2
    end = bar.y - BAR_HEIGHT / 2
    return f"M{x:.1f},{start:.1f} L{x:.1f},{end:.1f}", (x - 16, end - 8)


def _curve(source, target):
    """A quadratic curve between two states' borders, bent to the right of its direction:
    down for a move forward, up over the others for a move back."""
    dx, dy = target.x - source.x, target.y - source.y
    length = math.hypot(dx, dy)
    backward = dx < 0 or (dx == 0 and dy < 0)
    bend = length * (BACKWARD_ARC if backward else FORWARD_SAG)
    if backward and dy < 0 and abs(dx) <= 2 * COLUMN:
        bend = -bend                                # short, up a row: under, not over
    normal = (-dy / length, dx / length)            # right of travel, y pointing down
    middle = ((source.x + target.x) / 2, (source.y + target.y) / 2)
    control = (middle[0] + normal[0] * bend, middle[1] + normal[1] * bend)
    start, end = _border(source, control), _border(target, control)
    path = (f"M{start[0]:.1f},{start[1]:.1f} Q{control[0]:.1f},{control[1]:.1f} "
            f"{end[0]:.1f},{end[1]:.1f}")
    label = ((start[0] + 2 * control[0] + end[0]) / 4,      # the curve's own midpoint
             (start[1] + 2 * control[1] + end[1]) / 4 - 4)
    return path, label


def _border(place, toward):
    """Where the line from the centre of `place` toward `toward` leaves its box."""
    dx, dy = toward[0] - place.x, toward[1] - place.y
    scale = min(NODE_WIDTH / 2 / abs(dx) if dx else math.inf,
                NODE_HEIGHT / 2 / abs(dy) if dy else math.inf)
    return place.x + dx * scale, place.y + dy * scale


def _text(value):
    return html.escape(str(value), quote=True)
