from django.contrib import admin

from webapp.workspaces.models import Membership, SiteSettings, Workspace


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0


@admin.register(Workspace)
class WorkspaceAdmin(admin.ModelAdmin):
    list_display = ["name", "created_at"]
    inlines = [MembershipInline]


@admin.register(SiteSettings)
class SiteSettingsAdmin(admin.ModelAdmin):
    list_display = ["__str__", "allowed_gpus", "max_upload_mb", "allow_trust_remote_code"]

    def has_add_permission(self, request):
        return not SiteSettings.objects.exists()
