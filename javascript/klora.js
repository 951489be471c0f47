// sd-webui-klora: hover help on the K-LoRA accordion, and "K-LoRA subject" / "K-LoRA style" buttons on
// the LoRA cards of the extra-networks pane. Plain script, loaded by the WebUI on every page.
//
// Ids it relies on (built by lib_klora/ui.py and the WebUI, identical in A1111 1.10 and Forge):
//   #klora_<tab>_<field>            one per control, <tab> = txt2img | img2img (every FIELD_HELP key,
//                                   the reference-image upload boxes and controls in closed or hidden
//                                   sections included: those get their titles once gradio renders them)
//   #klora_<tab>_help_data          hidden HTML whose .klora-help-data[data-help] holds FIELD_HELP as JSON
//   #klora_<tab>_card_pick          hidden textbox, and #klora_<tab>_card_pick_apply, its hidden button
//   #klora_<tab>_accordion          the accordion (gradio marks its .label-wrap "open" when expanded); it
//                                   holds nested accordions (#klora_<tab>_dynamic_group, _hires_group,
//                                   _guidance_group) whose headers come after its own
//   #<tab>_lora_cards > .card       LoRA cards; data-name is the name in the WebUI's LoRA list
(function() {
    "use strict";

    var TABS = ["txt2img", "img2img"];
    var MARK = "data-klora-buttons";
    var helpByTab = {};

    function byId(id) {
        return document.getElementById(id);
    }

    function parseHelp(text) {
        try {
            var help = JSON.parse(text);
            return help && typeof help === "object" ? help : null;
        } catch (e) {
            return null;
        }
    }

    // The help texts come from Python (FIELD_HELP), so they never drift from the parameter model.
    function helpFromDom(tab) {
        var holder = byId("klora_" + tab + "_help_data");
        var node = holder && holder.querySelector(".klora-help-data");
        return node ? node.getAttribute("data-help") : null;
    }

    // Fallback for a gradio build that does not render invisible blocks: read the component config.
    function helpFromConfig(tab) {
        var config = window.gradio_config;
        if (!config || !Array.isArray(config.components)) return null;
        for (var i = 0; i < config.components.length; i++) {
            var props = config.components[i].props || {};
            if (props.elem_id === "klora_" + tab + "_help_data" && typeof props.value === "string") {
                var doc = new DOMParser().parseFromString(props.value, "text/html");
                var node = doc.querySelector(".klora-help-data");
                return node ? node.getAttribute("data-help") : null;
            }
        }
        return null;
    }

    function helpFor(tab) {
        if (!helpByTab[tab]) {
            var text = helpFromDom(tab) || helpFromConfig(tab);
            helpByTab[tab] = text ? parseHelp(text) : null;
        }
        return helpByTab[tab];
    }

    function setTitle(element, text) {
        if (element.title !== text) element.title = text; // unchanged titles cause no DOM churn
    }

    function applyHelp(tab) {
        var help = helpFor(tab);
        if (!help) return;
        Object.keys(help).forEach(function(field) {
            var element = byId("klora_" + tab + "_" + field);
            if (!element) return;
            setTitle(element, help[field]);
            // An empty title on a child hides the ancestor's (A1111's hints.js blanks dropdown inputs).
            element.querySelectorAll("input, textarea").forEach(function(input) {
                if (!input.title) input.title = help[field];
            });
        });
    }

    function fireInput(element) {
        if (typeof updateInput === "function") {
            updateInput(element); // the WebUI's helper: the input event gradio listens to
        } else {
            element.dispatchEvent(new Event("input", {bubbles: true}));
        }
    }

    function openAccordion(tab) {
        var accordion = byId("klora_" + tab + "_accordion");
        // The first .label-wrap is the accordion's own header; nested accordions come later.
        var header = accordion && accordion.querySelector(".label-wrap");
        if (header && !header.classList.contains("open")) header.click();
    }

    // Python does the actual work (apply_card_pick): it sets the dropdown (with a fresh LoRA list, so
    // a card added after page load works too) and ticks "Enable". A dropdown cannot be set reliably
    // from outside gradio, a textbox can.
    function pick(tab, role, name) {
        var box = document.querySelector("#klora_" + tab + "_card_pick textarea, #klora_" + tab + "_card_pick input");
        var apply = byId("klora_" + tab + "_card_pick_apply");
        if (apply && apply.tagName !== "BUTTON") apply = apply.querySelector("button");
        if (!box || !apply) {
            console.warn("K-LoRA: the accordion of the " + tab + " tab was not found");
            return false;
        }
        box.value = JSON.stringify({role: role, name: name});
        fireInput(box);
        openAccordion(tab);
        apply.click();
        return true;
    }

    function onPickClick(event) {
        // The card's own onclick inserts <lora:...> into the prompt; this button must not.
        event.preventDefault();
        event.stopPropagation();
        var button = event.currentTarget;
        var card = button.closest(".card");
        var name = card && card.getAttribute("data-name");
        if (!name) return;
        if (pick(button.getAttribute("data-klora-tab"), button.getAttribute("data-klora-role"), name)) {
            button.classList.add("klora-picked");
            setTimeout(function() {
                button.classList.remove("klora-picked");
            }, 800);
        }
    }

    function makeButton(tab, role, label) {
        var button = document.createElement("button");
        button.type = "button";
        button.className = "klora-card-button";
        button.textContent = label;
        button.title = "Use this LoRA as the K-LoRA " + role + " (" + tab + ")";
        button.setAttribute("data-klora-tab", tab);
        button.setAttribute("data-klora-role", role);
        button.addEventListener("click", onPickClick);
        return button;
    }

    function addCardButtons(tab) {
        var container = byId(tab + "_lora_cards");
        if (!container) return;
        // Marked cards are skipped, so repeated calls add nothing; a card the WebUI re-renders is new
        // and unmarked, and gets its buttons again.
        container.querySelectorAll(".card:not([" + MARK + "])").forEach(function(card) {
            card.setAttribute(MARK, "1");
            if (!card.getAttribute("data-name") || card.querySelector(".klora-card-actions")) return;
            var bar = document.createElement("div");
            bar.className = "klora-card-actions";
            bar.appendChild(makeButton(tab, "subject", "K-LoRA subject"));
            bar.appendChild(makeButton(tab, "style", "K-LoRA style"));
            card.appendChild(bar);
        });
    }

    function update() {
        TABS.forEach(function(tab) {
            applyHelp(tab);
            addCardButtons(tab);
        });
    }

    if (typeof onUiLoaded === "function") onUiLoaded(update);
    // onAfterUiUpdate is debounced by the WebUI (cheap during generation); plain onUiUpdate otherwise.
    if (typeof onAfterUiUpdate === "function") {
        onAfterUiUpdate(update);
    } else if (typeof onUiUpdate === "function") {
        onUiUpdate(update);
    }

    // For tests and other extensions.
    window.kloraPickLora = pick;
})();
